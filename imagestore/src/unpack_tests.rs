//! Layer unpacking: every entry type, whiteouts, compression, and every hostile case.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::IdShift;
use crate::digest::Digest;
use crate::error::{Error, ErrorKind};
use crate::layers::{Layer, LayerStore};
use crate::unpack::Limits;

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

pub(crate) fn layer_of(tar: &[u8], compressed: &[u8], media_type: &str) -> Layer {
    let diff_id = Digest::sha256_of(tar);
    Layer {
        digest: Digest::sha256_of(compressed),
        size: compressed.len() as u64,
        media_type: media_type.into(),
        chain_id: diff_id.clone(),
        diff_id,
    }
}

/// A store root with `layers/` and `tmp/`, plus a canary directory outside it.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: LayerStore,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["root/layers", "root/tmp", "outside"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        fs::write(dir.path().join("outside/passwd"), b"original").unwrap();
        let store = LayerStore::new(dir.path().join("root/layers"), dir.path().join("root/tmp"));
        Fixture { dir, store }
    }
    pub fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }
    pub fn unpack_with(&self, layer: &Layer, compressed: &[u8], limits: Limits) -> Result<PathBuf, Error> {
        self.store.unpack_verified(layer, compressed, None, limits, IdShift::IDENTITY)?;
        Ok(self.store.diff_path(&layer.chain_id))
    }
    pub fn unpack(&self, tar: &[u8]) -> Result<PathBuf, Error> {
        let layer = layer_of(tar, tar, OCI_TAR);
        self.unpack_with(&layer, tar, limits())
    }
    /// Nothing outside the layers dir changed, no staging dir is left, and no layer was committed.
    pub fn assert_untouched(&self) {
        let outside: Vec<_> = fs::read_dir(self.outside()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(outside, ["passwd"], "something was written outside the layer");
        assert_eq!(fs::read(self.outside().join("passwd")).unwrap(), b"original");
        assert_eq!(fs::read_dir(self.dir.path().join("root/tmp")).unwrap().count(), 0, "staging directory left behind");
        assert!(self.store.list().unwrap().is_empty(), "a refused layer was committed");
    }
}

fn limits() -> Limits {
    Limits { max_bytes: 1 << 30, max_entries: 100_000 }
}

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(0);
    h
}

/// A GNU header with a raw name (bypassing tar's own path checks, as an attacker would).
fn raw_header(kind: tar::EntryType, name: &[u8], link: &[u8], size: u64) -> tar::Header {
    let mut h = header(kind, 0o644);
    h.set_size(size);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name = [0; 100];
    gnu.name[..name.len()].copy_from_slice(name);
    gnu.linkname = [0; 100];
    gnu.linkname[..link.len()].copy_from_slice(link);
    h.set_cksum();
    h
}

fn append_raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) {
    let h = raw_header(kind, name.as_bytes(), link.as_bytes(), data.len() as u64);
    b.append(&h, data).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, mode);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(tar::EntryType::Directory, mode);
    b.append_data(&mut h, path, &[][..]).unwrap();
}

fn expect_hostile(err: Error, layer: &Layer, entry: &str, reason: &str) {
    let msg = err.to_string();
    assert!(matches!(err.kind(), ErrorKind::FailedPrecondition | ErrorKind::ResourceExhausted), "{msg}");
    assert!(msg.contains(&layer.digest.to_string()), "error does not name the layer: {msg}");
    assert!(msg.contains(entry), "error does not name the entry {entry:?}: {msg}");
    assert!(msg.contains(reason), "error does not say {reason:?}: {msg}");
    assert_lowercase(&msg);
}

/// Our own words are lowercase; quoted names from the layer may be anything.
pub(crate) fn assert_lowercase(msg: &str) {
    let mut own = String::new();
    let mut quote = None;
    for c in msg.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) => own.push(c),
            _ => {}
        }
    }
    assert_eq!(own, own.to_lowercase(), "error is not lowercase: {msg}");
}

fn hostile(build: impl FnOnce(&mut tar::Builder<Vec<u8>>), entry: &str, reason: &str) {
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    let tar = b.into_inner().unwrap();
    let layer = layer_of(&tar, &tar, OCI_TAR);
    let err = fx.unpack_with(&layer, &tar, limits()).expect_err("hostile layer accepted");
    expect_hostile(err, &layer, entry, reason);
    fx.assert_untouched();
}

fn all_entry_types() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "./", 0o755);
    dir(&mut b, "bin", 0o755);
    let mut h = header(tar::EntryType::Regular, 0o4755);
    h.set_uid(1000);
    h.set_gid(2000);
    h.set_mtime(1_500_000_000);
    let data = b"#!/bin/sh\necho hi\n";
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "bin/tool", &data[..]).unwrap();
    // xattrs, as Go's archive/tar writes them: PAX SCHILY.xattr records.
    let cap = [1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // cap_net_bind_service, v2
    b.append_pax_extensions([
        ("SCHILY.xattr.user.note", &b"hello"[..]),
        ("SCHILY.xattr.security.capability", &cap[..]),
    ])
    .unwrap();
    file(&mut b, "bin/ping", 0o755, b"ping");
    dir(&mut b, "tmp", 0o1777);
    let mut h = header(tar::EntryType::Symlink, 0o777);
    h.set_uid(1000);
    b.append_pax_extensions([("SCHILY.xattr.trusted.label", &b"link"[..])]).unwrap();
    b.append_link(&mut h, "bin/sh", "tool").unwrap();
    let mut h = header(tar::EntryType::Link, 0o644);
    b.append_link(&mut h, "bin/tool-again", "bin/tool").unwrap();
    dir(&mut b, "dev", 0o755);
    let mut h = header(tar::EntryType::Char, 0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Block, 0o660);
    h.set_device_major(7).unwrap();
    h.set_device_minor(0).unwrap();
    b.append_data(&mut h, "dev/loop0", &[][..]).unwrap();
    let mut h = header(tar::EntryType::Fifo, 0o600);
    b.append_data(&mut h, "dev/fifo", &[][..]).unwrap();
    // A long name (GNU long name record) and a file whose parent directory is implied.
    let long = format!("deep/{}/file", "d".repeat(150));
    file(&mut b, &long, 0o640, b"long");
    // An absolute name lands inside the layer, as containerd does it.
    append_raw(&mut b, tar::EntryType::Regular, "/etc/hostname", "", b"node\n");
    b.into_inner().unwrap()
}

fn check_all_entry_types(root: &Path) {
    let tool = fs::symlink_metadata(root.join("bin/tool")).unwrap();
    assert_eq!(fs::read(root.join("bin/tool")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid bit lost (chown after chmod?)");
    assert_eq!((tool.uid(), tool.gid()), (1000, 2000));
    assert_eq!(tool.mtime(), 1_500_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(fs::symlink_metadata(root.join("bin/tool-again")).unwrap().ino(), tool.ino());
    let cap = rustix::fs::getxattr(root.join("bin/ping"), "security.capability", &mut [0u8; 64]).unwrap();
    assert_eq!(cap, 20, "security.capability missing (set before chown?)");
    let mut note = [0u8; 16];
    let n = rustix::fs::getxattr(root.join("bin/ping"), "user.note", &mut note).unwrap();
    assert_eq!(&note[..n], b"hello");
    assert_eq!(fs::symlink_metadata(root.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(fs::symlink_metadata(root.join("tmp")).unwrap().mtime(), 1_600_000_000, "directory mtime not restored");
    let sh = fs::symlink_metadata(root.join("bin/sh")).unwrap();
    assert!(sh.file_type().is_symlink());
    assert_eq!(sh.uid(), 1000);
    assert_eq!(fs::read_link(root.join("bin/sh")).unwrap(), Path::new("tool"));
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!((rustix::fs::major(null.rdev()), rustix::fs::minor(null.rdev())), (1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let loop0 = fs::symlink_metadata(root.join("dev/loop0")).unwrap();
    assert!(loop0.file_type().is_block_device());
    assert_eq!(rustix::fs::major(loop0.rdev()), 7);
    assert!(fs::symlink_metadata(root.join("dev/fifo")).unwrap().file_type().is_fifo());
    let long = root.join(format!("deep/{}/file", "d".repeat(150)));
    assert_eq!(fs::read(&long).unwrap(), b"long");
    assert_eq!(fs::symlink_metadata(&long).unwrap().permissions().mode() & 0o777, 0o640);
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"node\n");
    assert_eq!(fs::symlink_metadata(root).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn unpacks_every_entry_type_in_every_compression() {
    let tar = all_entry_types();
    for (compressed, media_type) in [(tar.clone(), OCI_TAR), (gzip(&tar), OCI_GZIP), (zstd(&tar), OCI_ZSTD)] {
        let fx = Fixture::new();
        let layer = layer_of(&tar, &compressed, media_type);
        let root = fx.unpack_with(&layer, &compressed, limits()).unwrap();
        check_all_entry_types(&root);
        assert_eq!(fs::read_dir(fx.dir.path().join("root/tmp")).unwrap().count(), 0);
    }
    // Compression is recognised by magic bytes, whatever the media type claims.
    let fx = Fixture::new();
    let compressed = gzip(&tar);
    let layer = layer_of(&tar, &compressed, "application/vnd.docker.image.rootfs.diff.tar");
    check_all_entry_types(&fx.unpack_with(&layer, &compressed, limits()).unwrap());
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_opaque_dirs() {
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "etc", 0o755);
    file(&mut b, "etc/.wh.motd", 0o644, b"");
    dir(&mut b, "var/cache", 0o755);
    file(&mut b, "var/cache/.wh..wh..opq", 0o644, b"");
    file(&mut b, "var/cache/new", 0o644, b"n");
    file(&mut b, ".wh..wh.plnk", 0o644, b""); // aufs bookkeeping: ignored
    let root = fx.unpack(&b.into_inner().unwrap()).unwrap();
    let motd = fs::symlink_metadata(root.join("etc/motd")).unwrap();
    assert!(motd.file_type().is_char_device());
    assert_eq!(motd.rdev(), 0);
    assert!(!root.join("etc/.wh.motd").exists());
    let mut value = [0u8; 4];
    let n = rustix::fs::getxattr(root.join("var/cache"), "trusted.overlay.opaque", &mut value).unwrap();
    assert_eq!(&value[..n], b"y");
    assert!(!root.join("var/cache/.wh..wh..opq").exists());
    assert_eq!(fs::read(root.join("var/cache/new")).unwrap(), b"n");
    assert!(!root.join(".wh..wh.plnk").exists() && !root.join("plnk").exists());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "a", 0o755);
    file(&mut b, "a/inner", 0o644, b"x");
    file(&mut b, "a", 0o600, b"now a file");
    file(&mut b, "b", 0o644, b"file");
    dir(&mut b, "b", 0o700);
    file(&mut b, "b/c", 0o644, b"c");
    let root = fx.unpack(&b.into_inner().unwrap()).unwrap();
    assert_eq!(fs::read(root.join("a")).unwrap(), b"now a file");
    assert!(root.join("b").is_dir());
    assert_eq!(fs::read(root.join("b/c")).unwrap(), b"c");
}

#[test]
fn refuses_dotdot_escapes() {
    hostile(
        |b| append_raw(b, tar::EntryType::Regular, "../passwd", "", b"pwned"),
        "../passwd",
        "escapes the layer root",
    );
    hostile(
        |b| append_raw(b, tar::EntryType::Regular, "a/../../../outside/passwd", "", b"x"),
        "a/../../../outside/passwd",
        "escapes",
    );
    hostile(|b| append_raw(b, tar::EntryType::Directory, "/../x", "", b""), "/../x", "escapes");
}

#[test]
fn never_follows_a_symlink_planted_in_the_layer() {
    let fx = Fixture::new();
    let outside = fx.outside().display().to_string();
    // Writing through a symlinked directory, absolute or relative target.
    for target in [outside.clone(), "../../../../outside".to_string()] {
        let t = target.clone();
        hostile(
            move |b| {
                append_raw(b, tar::EntryType::Symlink, "escape", &t, b"");
                append_raw(b, tar::EntryType::Regular, "escape/passwd", "", b"pwned");
            },
            "escape/passwd",
            "symlink",
        );
    }
    // A file entry with the symlink's own name replaces the link; it never writes through it.
    let fx2 = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    append_raw(&mut b, tar::EntryType::Symlink, "passwd", &fx2.outside().join("passwd").display().to_string(), b"");
    append_raw(&mut b, tar::EntryType::Regular, "passwd", "", b"pwned");
    let root = fx2.unpack(&b.into_inner().unwrap()).unwrap();
    assert_eq!(fs::read(fx2.outside().join("passwd")).unwrap(), b"original");
    assert_eq!(fs::read(root.join("passwd")).unwrap(), b"pwned");
    // Same for a directory entry over a symlink, then a file in it.
    hostile(
        move |b| {
            append_raw(b, tar::EntryType::Symlink, "d", &outside, b"");
            append_raw(b, tar::EntryType::Regular, "d/x/y", "", b"pwned");
        },
        "d/x/y",
        "symlink",
    );
}

#[test]
fn refuses_hard_links_out_of_the_layer() {
    let fx = Fixture::new();
    let outside = fx.outside().join("passwd").display().to_string();
    hostile(|b| append_raw(b, tar::EntryType::Link, "hl", "../../outside/passwd", b""), "hl", "hard link target");
    // An absolute target is taken inside the layer, where it does not exist.
    let o = outside.clone();
    hostile(move |b| append_raw(b, tar::EntryType::Link, "hl", &o, b""), "hl", "not in this layer");
    // Through a symlink planted earlier.
    let o = fx.outside().display().to_string();
    hostile(
        move |b| {
            append_raw(b, tar::EntryType::Symlink, "s", &o, b"");
            append_raw(b, tar::EntryType::Link, "hl", "s/passwd", b"");
        },
        "hl",
        "symlink",
    );
    // A hard link to a symlink links the symlink itself, never its target.
    let fx2 = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    append_raw(&mut b, tar::EntryType::Symlink, "s", &outside, b"");
    append_raw(&mut b, tar::EntryType::Link, "hl", "s", b"");
    let root = fx2.unpack(&b.into_inner().unwrap()).unwrap();
    assert!(fs::symlink_metadata(root.join("hl")).unwrap().file_type().is_symlink());
    assert_eq!(fs::symlink_metadata(fx2.outside().join("passwd")).unwrap().nlink(), 1);
}

#[test]
fn refuses_deceptive_headers() {
    // Declares more data than the stream has.
    hostile(
        |b| {
            let mut h = raw_header(tar::EntryType::Regular, b"big", b"", 10 << 20);
            h.set_cksum();
            b.get_mut().extend_from_slice(h.as_bytes());
            b.get_mut().extend_from_slice(&[7u8; 1024]);
        },
        "big",
        "ends before",
    );
    // A broken checksum.
    hostile(
        |b| {
            let mut h = raw_header(tar::EntryType::Regular, b"x", b"", 0);
            h.as_gnu_mut().unwrap().cksum = *b"0000000\0";
            b.get_mut().extend_from_slice(h.as_bytes());
        },
        "x",
        "checksum",
    );
    // A device that claims data, to desynchronise parsers that disagree about it.
    hostile(|b| append_raw(b, tar::EntryType::Char, "dev", "", b"hidden entry"), "dev", "declares");
    // A GNU long name record of 2 MiB: a memory bomb for naive readers.
    hostile(
        |b| {
            let h = raw_header(tar::EntryType::GNULongName, b"././@LongLink", b"", 2 << 20);
            b.get_mut().extend_from_slice(h.as_bytes());
            b.get_mut().extend(std::iter::repeat_n(b'a', 2 << 20));
        },
        "",
        "exceeds",
    );
    // Unknown entry types are not guessed at.
    hostile(|b| append_raw(b, tar::EntryType::new(b'V'), "vol", "", b""), "vol", "unsupported tar entry type");
    // Names the kernel cannot hold are refused as such, not as a local failure.
    let long = format!("{}/x", "n".repeat(300));
    let l2 = long.clone();
    hostile(
        move |b| {
            let mut h = header(tar::EntryType::Regular, 0o644);
            b.append_data(&mut h, &l2, &[][..]).unwrap();
        },
        &long,
        "longer than 255 bytes",
    );
    // Whiteout of nothing.
    hostile(|b| append_raw(b, tar::EntryType::Regular, "d/.wh.", "", b""), "d/.wh.", "whiteout names no file");
}

#[test]
fn enforces_bomb_limits() {
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "zeros", 0o644, &vec![0u8; 3 << 20]);
    let tar = b.into_inner().unwrap();
    let compressed = gzip(&tar);
    assert!(compressed.len() < 64 << 10, "the bomb should compress well");
    let layer = layer_of(&tar, &compressed, OCI_GZIP);
    let err = fx.unpack_with(&layer, &compressed, Limits { max_bytes: 1 << 20, max_entries: 10 }).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    expect_hostile(err, &layer, "zeros", "max_layer_bytes");
    fx.assert_untouched();

    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..20 {
        file(&mut b, &format!("f{i}"), 0o644, b"");
    }
    let tar = b.into_inner().unwrap();
    let layer = layer_of(&tar, &tar, OCI_TAR);
    let err = fx.unpack_with(&layer, &tar, Limits { max_bytes: 1 << 20, max_entries: 10 }).unwrap_err();
    assert!(err.to_string().contains("max_layer_entries"), "{err}");
    fx.assert_untouched();

    // Data after the end-of-archive marker counts too.
    let fx = Fixture::new();
    let mut tar = tar::Builder::new(Vec::new()).into_inner().unwrap();
    tar.extend(std::iter::repeat_n(1u8, 2 << 20));
    let layer = layer_of(&tar, &tar, OCI_TAR);
    let err = fx.unpack_with(&layer, &tar, limits()).unwrap_err();
    assert!(err.to_string().contains("after the end of the tar archive"), "{err}");
    fx.assert_untouched();
}

#[test]
fn refuses_digest_and_size_mismatches() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "f", 0o644, b"content");
    let tar = b.into_inner().unwrap();
    let compressed = gzip(&tar);

    let fx = Fixture::new();
    let mut layer = layer_of(&tar, &compressed, OCI_GZIP);
    layer.digest = Digest::sha256_of(b"something else");
    let err = fx.unpack_with(&layer, &compressed, limits()).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer.digest.to_string()), "{err}");
    fx.assert_untouched();

    let fx = Fixture::new();
    let mut layer = layer_of(&tar, &compressed, OCI_GZIP);
    layer.diff_id = Digest::sha256_of(b"other tar");
    layer.chain_id = layer.diff_id.clone();
    let err = fx.unpack_with(&layer, &compressed, limits()).unwrap_err();
    assert!(err.to_string().contains("diff_id"), "{err}");
    fx.assert_untouched();

    let fx = Fixture::new();
    let mut layer = layer_of(&tar, &compressed, OCI_GZIP);
    layer.size -= 1;
    let err = fx.unpack_with(&layer, &compressed, limits()).unwrap_err();
    assert!(err.to_string().contains("size mismatch") || err.to_string().contains("longer"), "{err}");
    fx.assert_untouched();

    // Corrupt compressed data is reported as such, with the layer digest.
    let fx = Fixture::new();
    let mut broken = compressed.clone();
    let mid = broken.len() / 2;
    broken[mid] ^= 0xff;
    broken[mid + 1] ^= 0xff;
    let layer = layer_of(&tar, &broken, OCI_GZIP);
    let err = fx.unpack_with(&layer, &broken, limits()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains(&layer.digest.to_string()), "{err}");
    fx.assert_untouched();
}

#[test]
fn shifts_ownership_in_one_place() {
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644);
    h.set_uid(5);
    h.set_gid(6);
    b.append_data(&mut h, "f", &[][..]).unwrap();
    let tar = b.into_inner().unwrap();
    let layer = layer_of(&tar, &tar, OCI_TAR);
    fx.store.unpack_verified(&layer, &tar[..], None, limits(), IdShift::new(0x7FFE_0000)).unwrap();
    let md = fs::symlink_metadata(fx.store.diff_path(&layer.chain_id).join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0x7FFE_0005, 0x7FFE_0006));
    // The layer root too: a tar without a `./` entry leaves nothing owned by a node user.
    let md = fs::symlink_metadata(fx.store.diff_path(&layer.chain_id)).unwrap();
    assert_eq!((md.uid(), md.gid()), (0x7FFE_0000, 0x7FFE_0000));
    // Ids that do not fit the foreign range are refused rather than wrapped.
    let fx = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644);
    h.set_uid(70_000);
    b.append_data(&mut h, "f", &[][..]).unwrap();
    let tar = b.into_inner().unwrap();
    let layer = layer_of(&tar, &tar, OCI_TAR);
    let err = fx.store.unpack_verified(&layer, &tar[..], None, limits(), IdShift::new(0x7FFE_0000)).unwrap_err();
    assert!(err.to_string().contains("uid 70000 is outside 0..65535"), "{err}");
    fx.assert_untouched();
}
