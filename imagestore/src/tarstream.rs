//! A strict, bounded reader of tar streams (ustar, GNU long names, PAX records).
//!
//! We parse tar ourselves instead of using the `tar` crate's reader because that reader loads GNU
//! long-name and PAX records of any declared size into memory: a few kilobytes of gzip can declare
//! a many-gigabyte long name. Here every metadata record is capped, numbers are checked, and the
//! header checksum is verified; anything we do not understand is an error, never a guess.

use std::collections::BTreeMap;
use std::io::{self, Read};

const BLOCK: usize = 512;
/// Longest GNU long name / long link / PAX record set we accept. PATH_MAX is 4096 and xattrs are
/// at most 64 KiB each, so 1 MiB leaves room for legitimate use and none for memory bombs.
const MAX_METADATA: u64 = 1 << 20;

/// The kind of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    HardLink,
    Symlink,
    CharDevice,
    BlockDevice,
    Directory,
    Fifo,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Regular => "regular file",
            Kind::HardLink => "hard link",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Directory => "directory",
            Kind::Fifo => "fifo",
        }
    }
}

/// One entry's metadata after folding in GNU long names and PAX records.
#[derive(Debug, Clone)]
pub struct Header {
    pub kind: Kind,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch (PAX may carry fractions; negative times clamp to 0).
    pub mtime: (i64, u32),
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `(name, value)` from `SCHILY.xattr.<name>` PAX records, as Go's archive/tar writes them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why a tar stream is malformed. The message names the problem; the caller adds the layer.
#[derive(Debug)]
pub enum TarError {
    /// The stream itself is broken or lies (bad checksum, bad number, oversized record...).
    Malformed { entry: String, reason: String },
    /// Reading the underlying stream failed (network, decompression, limits).
    Io(io::Error),
}

impl From<io::Error> for TarError {
    fn from(e: io::Error) -> Self {
        TarError::Io(e)
    }
}

fn malformed(entry: &[u8], reason: impl Into<String>) -> TarError {
    TarError::Malformed { entry: String::from_utf8_lossy(entry).into_owned(), reason: reason.into() }
}

/// Reads entries one at a time; the caller reads each entry's data with [`TarReader::data`]
/// before asking for the next header (unread data is skipped).
#[derive(Debug)]
pub struct TarReader<R: Read> {
    inner: R,
    /// Bytes of the current entry's data not yet read, then its padding.
    remaining: u64,
    padding: u64,
    finished: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader { inner, remaining: 0, padding: 0, finished: false }
    }

    /// The underlying reader, e.g. to drain what follows the end-of-archive marker.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// A reader over the current entry's data.
    pub fn data(&mut self) -> EntryData<'_, R> {
        EntryData { reader: self }
    }

    fn skip_rest(&mut self) -> io::Result<()> {
        let n = self.remaining + self.padding;
        if n > 0 {
            let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
            if copied != n {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar stream ends inside an entry"));
            }
        }
        self.remaining = 0;
        self.padding = 0;
        Ok(())
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut block[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(malformed(b"", "tar stream ends inside a header")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn read_metadata(&mut self, size: u64, what: &str) -> Result<Vec<u8>, TarError> {
        if size > MAX_METADATA {
            return Err(malformed(b"", format!("{what} record of {size} bytes exceeds the {MAX_METADATA} byte limit")));
        }
        let mut buf = vec![0; size as usize];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                malformed(b"", format!("tar stream ends inside a {what} record"))
            } else {
                e.into()
            }
        })?;
        let pad = padding(size);
        io::copy(&mut (&mut self.inner).take(pad), &mut io::sink())?;
        Ok(buf)
    }

    /// The next entry, or `None` at the end-of-archive marker (or a clean end of stream).
    pub fn next_header(&mut self) -> Result<Option<Header>, TarError> {
        if self.finished {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<BTreeMap<String, Vec<u8>>> = None;
        let mut block = [0u8; BLOCK];
        loop {
            if !self.read_block(&mut block)? {
                // A stream that ends without the zero blocks: accepted like GNU tar and Go do,
                // unless metadata records were waiting for their entry.
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(malformed(b"", "tar stream ends after an extended header"));
                }
                self.finished = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(malformed(b"", "end of archive after an extended header"));
                }
                self.finished = true;
                return Ok(None);
            }
            let name_field = cstr(&block[0..100]);
            verify_checksum(&block).map_err(|r| malformed(name_field, r))?;
            let typeflag = block[156];
            let size = parse_number(&block[124..136]).map_err(|r| malformed(name_field, format!("size: {r}")))?;
            match typeflag {
                b'L' => {
                    long_name = Some(trim_nul(self.read_metadata(size, "gnu long name")?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_metadata(size, "gnu long link")?));
                    continue;
                }
                b'x' => {
                    let records = self.read_metadata(size, "pax")?;
                    pax = Some(parse_pax(&records).map_err(|r| malformed(name_field, r))?);
                    continue;
                }
                b'g' => {
                    // Global PAX headers carry archive-wide defaults Go never writes for layers;
                    // they are read (bounded) and ignored, as containerd does.
                    self.read_metadata(size, "pax global")?;
                    continue;
                }
                _ => {}
            }
            let is_ustar = &block[257..263] == b"ustar\0";
            let mut path = match long_name.take() {
                Some(name) => name,
                None if is_ustar && block[345] != 0 => {
                    let mut p = cstr(&block[345..500]).to_vec();
                    p.push(b'/');
                    p.extend_from_slice(name_field);
                    p
                }
                None => name_field.to_vec(),
            };
            let mut link = long_link.take().unwrap_or_else(|| cstr(&block[157..257]).to_vec());
            let entry = path.clone();
            let num = |range: std::ops::Range<usize>, what: &str| {
                parse_number(&block[range]).map_err(|r| malformed(&entry, format!("{what}: {r}")))
            };
            let mode = num(100..108, "mode")?;
            let mut uid = num(108..116, "uid")?;
            let mut gid = num(116..124, "gid")?;
            let mut mtime = (i64::try_from(num(136..148, "mtime")?).unwrap_or(i64::MAX), 0u32);
            let mut size = size;
            let (dev_major, dev_minor) = if matches!(typeflag, b'3' | b'4') {
                let major = num(329..337, "devmajor")?;
                let minor = num(337..345, "devminor")?;
                (
                    u32::try_from(major).map_err(|_| malformed(&entry, "devmajor out of range"))?,
                    u32::try_from(minor).map_err(|_| malformed(&entry, "devminor out of range"))?,
                )
            } else {
                (0, 0)
            };
            let mut xattrs = Vec::new();
            if let Some(records) = pax.take() {
                for (key, value) in records {
                    let text = || String::from_utf8_lossy(&value).into_owned();
                    let number = |what: &str| {
                        text()
                            .parse::<u64>()
                            .map_err(|_| malformed(&entry, format!("pax {what} {:?} is not a number", text())))
                    };
                    match key.as_str() {
                        "path" => path = value,
                        "linkpath" => link = value,
                        "size" => size = number("size")?,
                        "uid" => uid = number("uid")?,
                        "gid" => gid = number("gid")?,
                        "mtime" => mtime = parse_pax_time(&text()).map_err(|r| malformed(&entry, r))?,
                        k if k.starts_with("SCHILY.xattr.") => {
                            xattrs.push((k.as_bytes()["SCHILY.xattr.".len()..].to_vec(), value));
                        }
                        k if k.starts_with("GNU.sparse.") => {
                            return Err(malformed(&entry, "sparse files are not supported"));
                        }
                        _ => {} // atime, ctime, comment, charset, uname, gname...: not needed
                    }
                }
            }
            let kind = match typeflag {
                // Pre-POSIX archives mark directories only by a trailing slash.
                b'0' | 0 if path.ends_with(b"/") && size == 0 => Kind::Directory,
                b'0' | 0 | b'7' => Kind::Regular,
                b'1' => Kind::HardLink,
                b'2' => Kind::Symlink,
                b'3' => Kind::CharDevice,
                b'4' => Kind::BlockDevice,
                b'5' => Kind::Directory,
                b'6' => Kind::Fifo,
                b'S' => return Err(malformed(&path, "sparse files are not supported")),
                other => {
                    return Err(malformed(&path, format!("unsupported tar entry type {:?}", other as char)));
                }
            };
            // Only regular files carry data; a size on anything else would desynchronise readers
            // that disagree about it (the classic tar-confusion trick), so it is refused.
            if kind != Kind::Regular && size != 0 && kind != Kind::HardLink {
                return Err(malformed(&path, format!("{} entry declares {size} data bytes", kind.name())));
            }
            if kind == Kind::HardLink && size != 0 {
                return Err(malformed(&path, "hard link entry declares data bytes"));
            }
            if path.contains(&0) || link.contains(&0) {
                return Err(malformed(&path, "name contains a nul byte"));
            }
            let mode = u32::try_from(mode).map_err(|_| malformed(&path, "mode out of range"))? & 0o7777;
            self.remaining = size;
            self.padding = padding(size);
            return Ok(Some(Header { kind, path, link, mode, uid, gid, size, mtime, dev_major, dev_minor, xattrs }));
        }
    }
}

/// The data of the current entry; reads end at the entry's size.
#[derive(Debug)]
pub struct EntryData<'a, R: Read> {
    reader: &'a mut TarReader<R>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reader.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.reader.remaining).unwrap_or(usize::MAX));
        let n = self.reader.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar stream ends inside an entry's data"));
        }
        self.reader.remaining -= n as u64;
        Ok(n)
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|&b| b == 0) {
        v.truncate(i);
    }
    v
}

fn verify_checksum(block: &[u8; BLOCK]) -> Result<(), String> {
    let stored = parse_number(&block[148..156]).map_err(|r| format!("header checksum: {r}"))?;
    let unsigned: u64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    // Some old writers summed signed bytes; accept both like GNU tar does.
    let signed: i64 =
        block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { i64::from(b as i8) }).sum();
    if stored == unsigned || i64::try_from(stored).ok() == Some(signed) {
        Ok(())
    } else {
        Err("header checksum mismatch".into())
    }
}

/// Octal (optionally space/NUL padded) or GNU base-256 numbers. Negative numbers are refused.
fn parse_number(field: &[u8]) -> Result<u64, String> {
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        if first == 0xff {
            return Err("negative base-256 number".into());
        }
        let mut value: u64 = u64::from(first & 0x7f);
        for &b in &field[1..] {
            value =
                value.checked_mul(256).and_then(|v| v.checked_add(u64::from(b))).ok_or("base-256 number overflows")?;
        }
        return Ok(value);
    }
    let text = cstr(field);
    let trimmed: Vec<u8> = text.iter().copied().skip_while(|&b| b == b' ').take_while(|&b| b != b' ').collect();
    if trimmed.is_empty() {
        return Ok(0);
    }
    let mut value: u64 = 0;
    for b in trimmed {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!("invalid octal digit {:?}", b as char));
        }
        value =
            value.checked_mul(8).and_then(|v| v.checked_add(u64::from(b - b'0'))).ok_or("octal number overflows")?;
    }
    Ok(value)
}

/// PAX records: `"<len> <key>=<value>\n"` repeated, len counting the whole record.
fn parse_pax(mut data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').ok_or("pax record without length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("pax record length is not a number")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("pax record length is inconsistent".into());
        }
        let record = &data[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or("pax record without '='")?;
        let key = String::from_utf8(record[..eq].to_vec()).map_err(|_| "pax key is not utf-8")?;
        out.insert(key, record[eq + 1..].to_vec());
        data = &data[len..];
    }
    Ok(out)
}

fn parse_pax_time(text: &str) -> Result<(i64, u32), String> {
    let bad = || format!("pax mtime {text:?} is not a time");
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if secs < 0 {
        return Ok((0, 0));
    }
    Ok((secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0"), Ok(0o644));
        assert_eq!(parse_number(b"  755 \0\0"), Ok(0o755));
        assert_eq!(parse_number(b"\0\0\0\0"), Ok(0));
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert!(parse_number(&[0xff; 8]).is_err());
        assert!(parse_number(b"0000949\0").is_err());
        assert!(parse_number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn pax_records() {
        let m = parse_pax(b"20 path=a/long/name\n27 SCHILY.xattr.user.k=v=1\n").unwrap();
        assert_eq!(m["path"], b"a/long/name");
        assert_eq!(m["SCHILY.xattr.user.k"], b"v=1");
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"x path=x\n").is_err());
        assert_eq!(parse_pax_time("1700000000.5").unwrap(), (1_700_000_000, 500_000_000));
    }
}
