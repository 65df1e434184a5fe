//! OCI images built by the tests themselves: layer tarballs (plain, gzip, zstd; hostile ones
//! too, with raw tar headers), image configs, manifests and indexes, all deterministic. Also the
//! checksum listings that compare a layer's source tar with what the store unpacked from it.
//!
//! Nothing here talks to a registry; [`crate::registry`] pushes what is built here.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Every entry's mtime unless given: the images are reproducible byte for byte.
pub const MTIME: u64 = 1_700_000_000;

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A blob as the registry stores it.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob { media_type: media_type.to_owned(), digest: sha256(&data), data }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }

    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").expect("sha256 digest")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(tar).unwrap();
                encoder.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
        }
    }
}

/// Builds one layer's tar. Names are written into the header as given (no checks, no `./`
/// added), so hostile entries are as easy to make as normal ones; names must fit the 100-byte
/// ustar name field.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for LayerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerBuilder").finish_non_exhaustive()
    }
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder { tar: tar::Builder::new(Vec::new()) }
    }

    /// Appends PAX extended-header records, which apply to the next entry (xattrs are
    /// `SCHILY.xattr.<name>` records, as Go's archive/tar and so docker/buildkit write them).
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.tar.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v))).unwrap();
        self
    }

    /// Appends an entry with a raw name and link name.
    #[allow(clippy::too_many_arguments)]
    pub fn raw(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        assert!(
            name.len() < 100 && link.len() < 100,
            "name too long for a ustar header: {}",
            String::from_utf8_lossy(name)
        );
        let mut header = tar::Header::new_ustar();
        {
            let old = header.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(MTIME);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.tar.append(&header, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.dir_owned(path, mode, 0, 0)
    }

    pub fn dir_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let name = format!("{}/", path.trim_end_matches('/'));
        self.raw(tar::EntryType::Directory, name.as_bytes(), b"", mode, uid, gid, b"")
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    pub fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Self {
        self.raw(tar::EntryType::Regular, path.as_bytes(), b"", mode, uid, gid, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Symlink, path.as_bytes(), target.as_bytes(), 0o777, 0, 0, b"")
    }

    /// A hard link `path` to the earlier entry `target`.
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Link, path.as_bytes(), target.as_bytes(), 0o644, 0, 0, b"")
    }

    /// Deletes `path` of the layers below (an AUFS whiteout, `.wh.<name>`).
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = split(path);
        let entry = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
        self.raw(tar::EntryType::Regular, entry.as_bytes(), b"", 0o644, 0, 0, b"")
    }

    /// Hides everything the layers below have in directory `dir` (`.wh..wh..opq`).
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        let entry = format!("{}/.wh..wh..opq", dir.trim_end_matches('/'));
        self.raw(tar::EntryType::Regular, entry.as_bytes(), b"", 0o644, 0, 0, b"")
    }

    /// The uncompressed tar.
    pub fn tar(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }

    pub fn build(self, compression: Compression) -> Layer {
        Layer::from_tar(self.tar(), compression)
    }
}

fn split(path: &str) -> (&str, &str) {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => ("", path),
    }
}

/// A layer: its (possibly compressed) blob and the tar it was made from.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Blob,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    pub tar: Vec<u8>,
}

impl Layer {
    pub fn from_tar(tar: Vec<u8>, compression: Compression) -> Layer {
        let data = compression.compress(&tar);
        let blob = Blob::new(compression.media_type(), data);
        // Hashing is slow in debug builds: an uncompressed blob is its own diff.
        let diff_id = if compression == Compression::None { blob.digest.clone() } else { sha256(&tar) };
        Layer { blob, diff_id, tar }
    }
}

/// The image config fields the tests vary.
#[derive(Debug, Clone)]
pub struct ConfigOptions {
    pub user: String,
    pub architecture: String,
    pub os: String,
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    /// The image's WORKDIR ("/" by default).
    pub working_dir: String,
    /// Overrides the diff_ids computed from the layers (for mismatch tests).
    pub diff_ids: Option<Vec<String>>,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        ConfigOptions {
            user: String::new(),
            architecture: host_architecture().to_owned(),
            os: "linux".into(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["/bin/sh".into()],
            working_dir: "/".into(),
            diff_ids: None,
        }
    }
}

/// The OCI name of the architecture the tests (and so the node) run on.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => panic!("no OCI name for architecture {other}"),
    }
}

/// An image: config, layers (bottom first) and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Layer>,
    pub manifest: Blob,
    pub architecture: String,
}

impl Image {
    pub fn new(layers: Vec<Layer>, options: ConfigOptions) -> Image {
        let diff_ids = options.diff_ids.clone().unwrap_or_else(|| layers.iter().map(|l| l.diff_id.clone()).collect());
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": options.architecture,
            "os": options.os,
            "config": {"User": options.user, "Env": options.env, "Cmd": options.cmd, "WorkingDir": options.working_dir},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": layers.iter().map(|_| json!({"created_by": "cri-systemd e2e"})).collect::<Vec<_>>(),
        });
        let config = Blob::new(MEDIA_CONFIG, serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(MEDIA_MANIFEST, serde_json::to_vec(&manifest).unwrap());
        Image { config, layers, manifest, architecture: options.architecture }
    }

    /// The image id CRI reports: the config digest.
    pub fn id(&self) -> &str {
        &self.config.digest
    }

    /// What the store reports as the image size: config plus compressed layers.
    pub fn size(&self) -> u64 {
        (self.config.data.len() + self.layers.iter().map(|l| l.blob.data.len()).sum::<usize>()) as u64
    }

    /// Chain ids of the layers (bottom first): the names of the unpacked layer directories.
    pub fn chain_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for layer in &self.layers {
            let next = match out.last() {
                None => layer.diff_id.clone(),
                Some(below) => sha256(format!("{below} {}", layer.diff_id).as_bytes()),
            };
            out.push(next);
        }
        out
    }
}

/// A multi-platform image index.
#[derive(Debug, Clone)]
pub struct Index {
    pub images: Vec<Image>,
    pub manifest: Blob,
}

impl Index {
    pub fn new(images: Vec<Image>) -> Index {
        let manifests: Vec<_> = images
            .iter()
            .map(|image| {
                let mut descriptor = image.manifest.descriptor();
                descriptor["platform"] = json!({"architecture": image.architecture, "os": "linux"});
                descriptor
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests});
        Index { manifest: Blob::new(MEDIA_INDEX, serde_json::to_vec(&index).unwrap()), images }
    }
}

// ---- the images the tests use -------------------------------------------------------------

/// Debian's static busybox (package busybox-static), the one program in every test image.
pub fn busybox_binary() -> Vec<u8> {
    std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static) is needed to build test images")
}

/// A busybox root file system as one layer: bin/busybox with applet symlinks and a hard link,
/// /etc with users (www-data is 33), a sticky /tmp, a setuid file, a directory owned by a user.
pub fn busybox_layer(compression: Compression) -> Layer {
    // Built once per compression and process: gzip and sha256 are slow in debug builds.
    static CACHE: std::sync::Mutex<Vec<(Compression, Layer)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, layer)) = cache.iter().find(|(c, _)| *c == compression) {
        return layer.clone();
    }
    let layer = build_busybox_layer(compression);
    cache.push((compression, layer.clone()));
    layer
}

fn build_busybox_layer(compression: Compression) -> Layer {
    let mut l = LayerBuilder::new();
    l.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox_binary())
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .hardlink("bin/true", "bin/busybox")
        .file("bin/setuid-marker", 0o4755, b"#!/bin/sh\n")
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\nuser:x:1002:1002::/home/user:/bin/sh\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nwww-data:x:33:\nuser:x:1002:\nextra:x:1004:\n")
        .file("etc/shadow", 0o640, b"root:*:19000:0:99999:7:::\n")
        .dir("tmp", 0o1777)
        .dir("home", 0o755)
        .dir_owned("home/user", 0o700, 1002, 1002)
        .file_owned("home/user/.profile", 0o600, 1002, 1002, b"export PS1='$ '\n")
        .dir("var", 0o755)
        .dir_owned("var/www", 0o750, 33, 33);
    l.build(compression)
}

/// A single-layer busybox image with the given USER.
pub fn busybox_image(user: &str) -> Image {
    Image::new(vec![busybox_layer(Compression::Gzip)], ConfigOptions { user: user.into(), ..Default::default() })
}

/// Three layers in three compressions, with whiteouts, an opaque directory and hard links
/// across them:
/// 1. (gzip) the busybox layer plus `etc/remove-me`, `var/cache/old/{a,b}`, `opt/keep`;
/// 2. (zstd) deletes `etc/remove-me` (whiteout), replaces `var/cache` (opaque) with `new`,
///    adds `opt/data` with a hard link `opt/data-link`, and a file in a new deep directory;
/// 3. (plain tar) rewrites `etc/passwd`, replaces `opt` of layers 1 and 2 (opaque) with one
///    holding hard links across nested directories, a symlink to a directory and a fifo, and
///    deletes the directory `usr/share/deep` of layer 2 with its file (whiteout).
pub fn layered_image() -> Image {
    let mut base = LayerBuilder::new();
    let busybox = busybox_binary();
    base.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/remove-me", 0o644, b"gone in layer 2\n")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .dir("var/cache/old", 0o700)
        .file("var/cache/old/a", 0o644, b"old a\n")
        .file("var/cache/b", 0o644, b"old b\n")
        .dir("opt", 0o755)
        .file("opt/keep", 0o644, b"kept until layer 3 deletes opt\n")
        .dir("tmp", 0o1777);
    let mut second = LayerBuilder::new();
    second
        .dir("etc", 0o755)
        .whiteout("etc/remove-me")
        .dir("var", 0o755)
        .dir("var/cache", 0o710)
        .opaque("var/cache")
        .file("var/cache/new", 0o640, b"new in layer 2\n")
        .dir("opt", 0o755)
        .file_owned("opt/data", 0o664, 1003, 1004, &vec![0x5a; 100_000])
        .hardlink("opt/data-link", "opt/data")
        .dir("usr", 0o755)
        .dir("usr/share", 0o755)
        .dir("usr/share/deep", 0o755)
        .file("usr/share/deep/file", 0o444, b"deep\n");
    let mut third = LayerBuilder::new();
    let random = pseudo_random(7, 300_000);
    third
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
        .dir("opt", 0o711)
        .opaque("opt")
        .dir("opt/a", 0o755)
        .dir("opt/a/b", 0o755)
        .file("opt/a/b/random", 0o600, &random)
        .hardlink("opt/random-link", "opt/a/b/random")
        .hardlink("opt/a/random-link-2", "opt/a/b/random")
        .symlink("opt/dir-link", "a/b")
        .raw(tar::EntryType::Fifo, b"opt/fifo", b"", 0o600, 0, 0, b"")
        .dir("usr", 0o755)
        .dir("usr/share", 0o755)
        .whiteout("usr/share/deep");
    Image::new(
        vec![base.build(Compression::Gzip), second.build(Compression::Zstd), third.build(Compression::None)],
        ConfigOptions { user: "1003:1004".into(), ..Default::default() },
    )
}

/// One image per architecture, the layer of each holding `/platform` with the architecture's
/// name, in one index. The host's architecture is always among them.
pub fn platform_index() -> Index {
    let mut arches = vec!["amd64", "arm64"];
    if !arches.contains(&host_architecture()) {
        arches.push(host_architecture());
    }
    let images = arches
        .into_iter()
        .map(|arch| {
            let mut l = LayerBuilder::new();
            l.file("platform", 0o644, format!("{arch}\n").as_bytes());
            Image::new(
                vec![l.build(Compression::Gzip)],
                ConfigOptions { architecture: arch.into(), ..Default::default() },
            )
        })
        .collect();
    Index::new(images)
}

/// An image of `count` layers: the busybox layer, then `count - 1` tiny ones, layer `i` adding
/// `layers/<i>` and rewriting `top` to `i` (alternately gzip and plain).
pub fn many_layers_image(count: usize) -> Image {
    let mut layers = vec![busybox_layer(Compression::Gzip)];
    layers.extend((1..count).map(|i| {
        let mut l = LayerBuilder::new();
        l.dir("layers", 0o755).file(&format!("layers/{i}"), 0o644, format!("{i}\n").as_bytes()).file(
            "top",
            0o644,
            format!("{i}\n").as_bytes(),
        );
        l.build(if i % 2 == 0 { Compression::Gzip } else { Compression::None })
    }));
    Image::new(layers, ConfigOptions::default())
}

/// An image of `layers` layers of `bytes_per_layer` incompressible bytes each (stored as plain
/// tar, so what the registry sends is what the store unpacks), made from `seed`.
pub fn big_image(seed: u64, layers: usize, bytes_per_layer: usize) -> Image {
    let layers = (0..layers)
        .map(|i| {
            let mut l = LayerBuilder::new();
            l.file(&format!("big-{seed}-{i}"), 0o644, &pseudo_random(seed * 1000 + i as u64, bytes_per_layer));
            l.build(Compression::None)
        })
        .collect();
    Image::new(layers, ConfigOptions::default())
}

/// Deterministic incompressible bytes (xorshift64*).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---- checksum listings --------------------------------------------------------------------

/// A listing of a file tree: path (relative, no leading `./`) -> one line describing the
/// entry's type, mode, owner, mtime, size and sha256 of the contents, link target, and hard
/// link group (the smallest path of the group, if the file has other names). The layer root
/// itself is not listed.
pub type Listing = BTreeMap<String, String>;

fn normalize(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let s = s.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
    s.to_owned()
}

fn describe_file(mode: u32, uid: u64, gid: u64, mtime: u64, data_sha: &str, size: u64) -> String {
    format!("file mode={:o} uid={uid} gid={gid} mtime={mtime} size={size} {data_sha}", mode & 0o7777)
}

/// The listing of a layer's uncompressed tar as the store should unpack it into a directory:
/// whiteouts become `whiteout` entries, an opaque marker marks its directory `opaque`.
pub fn listing_of_tar(tar_bytes: &[u8]) -> Listing {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut listing = Listing::new();
    let mut opaque = Vec::new();
    // hard link name -> target name; content descriptions of regular files.
    let mut links: Vec<(String, String)> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = normalize(&entry.path_bytes());
        let header = entry.header().clone();
        let (mode, uid, gid, mtime) =
            (header.mode().unwrap(), header.uid().unwrap(), header.gid().unwrap(), header.mtime().unwrap());
        if path.is_empty() {
            continue;
        }
        let (dir, name) = split(&path);
        if name == ".wh..wh..opq" {
            opaque.push(dir.to_owned());
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let hidden = if dir.is_empty() { hidden.to_owned() } else { format!("{dir}/{hidden}") };
            listing.insert(hidden, "whiteout".into());
            continue;
        }
        let line = match header.entry_type() {
            tar::EntryType::Directory => format!("dir mode={:o} uid={uid} gid={gid} mtime={mtime}", mode & 0o7777),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                describe_file(mode, uid, gid, mtime, &sha256(&data), data.len() as u64)
            }
            tar::EntryType::Symlink => {
                let target = String::from_utf8_lossy(&entry.link_name_bytes().unwrap()).into_owned();
                format!("symlink -> {target} uid={uid} gid={gid} mtime={mtime}")
            }
            tar::EntryType::Link => {
                links.push((path.clone(), normalize(&entry.link_name_bytes().unwrap())));
                continue;
            }
            tar::EntryType::Fifo => format!("fifo mode={:o} uid={uid} gid={gid} mtime={mtime}", mode & 0o7777),
            tar::EntryType::Char | tar::EntryType::Block => format!(
                "{} {}:{} mode={:o} uid={uid} gid={gid} mtime={mtime}",
                if header.entry_type() == tar::EntryType::Char { "chardev" } else { "blockdev" },
                header.device_major().unwrap().unwrap_or(0),
                header.device_minor().unwrap().unwrap_or(0),
                mode & 0o7777
            ),
            other => panic!("listing_of_tar: unexpected entry type {other:?} for {path}"),
        };
        listing.insert(path, line);
    }
    for dir in opaque {
        if let Some(line) = listing.get_mut(&dir) {
            line.push_str(" opaque");
        } else {
            listing.insert(dir, "opaque (implicit dir)".into());
        }
    }
    // Hard links share everything with their target; group them under the smallest name.
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (name, target) in &links {
        let line = listing.get(target).unwrap_or_else(|| panic!("hard link {name} to unknown {target}")).clone();
        listing.insert(name.clone(), line);
        groups.entry(target.clone()).or_default().push(name.clone());
    }
    for (target, mut names) in groups {
        names.push(target);
        let leader = names.iter().min().unwrap().clone();
        for name in names {
            listing.get_mut(&name).unwrap().push_str(&format!(" linkgroup={leader}"));
        }
    }
    listing
}

/// The listing of a directory tree on disk, in the same form as [`listing_of_tar`]: a 0:0
/// character device is a whiteout, `trusted.overlay.opaque=y` marks a directory `opaque`.
pub fn listing_of_dir(root: &Path) -> Listing {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut listing = Listing::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let (mode, uid, gid, mtime) = (md.mode(), u64::from(md.uid()), u64::from(md.gid()), md.mtime() as u64);
            let ft = md.file_type();
            let line = if ft.is_dir() {
                stack.push(path.clone());
                let mut line = format!("dir mode={:o} uid={uid} gid={gid} mtime={mtime}", mode & 0o7777);
                let mut value = [0u8; 8];
                if let Ok(n) = rustix::fs::lgetxattr(&path, "trusted.overlay.opaque", &mut value)
                    && &value[..n] == b"y"
                {
                    line.push_str(" opaque");
                }
                line
            } else if ft.is_file() {
                let data = std::fs::read(&path).unwrap();
                if md.nlink() > 1 {
                    inodes.entry((md.dev(), md.ino())).or_default().push(rel.clone());
                }
                describe_file(mode, uid, gid, mtime, &sha256(&data), data.len() as u64)
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).unwrap().to_string_lossy().into_owned();
                format!("symlink -> {target} uid={uid} gid={gid} mtime={mtime}")
            } else if ft.is_char_device() && md.rdev() == 0 {
                "whiteout".into()
            } else if ft.is_fifo() {
                format!("fifo mode={:o} uid={uid} gid={gid} mtime={mtime}", mode & 0o7777)
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = md.rdev();
                format!(
                    "{} {}:{} mode={:o} uid={uid} gid={gid} mtime={mtime}",
                    if ft.is_char_device() { "chardev" } else { "blockdev" },
                    rustix::fs::major(rdev),
                    rustix::fs::minor(rdev),
                    mode & 0o7777
                )
            } else {
                format!("other {ft:?}")
            };
            listing.insert(rel, line);
        }
    }
    for names in inodes.into_values() {
        if names.len() > 1 {
            let leader = names.iter().min().unwrap().clone();
            for name in names {
                listing.get_mut(&name).unwrap().push_str(&format!(" linkgroup={leader}"));
            }
        }
    }
    listing
}

/// `listing` (of a directory in the image store) with owners as the layers' tars give them: the
/// store keeps layer files shifted by its `layer_uid_shift` (the daemon's default is systemd's
/// foreign range, 0x7FFE0000); ids below `base` are left as they are.
pub fn unshifted(listing: Listing, base: u32) -> Listing {
    let unshift = |word: &str| -> String {
        for key in ["uid=", "gid="] {
            if let Some(id) = word.strip_prefix(key).and_then(|n| n.parse::<u64>().ok())
                && id >= u64::from(base)
            {
                return format!("{key}{}", id - u64::from(base));
            }
        }
        word.to_string()
    };
    listing.into_iter().map(|(path, line)| (path, line.split(' ').map(unshift).collect::<Vec<_>>().join(" "))).collect()
}

/// What an overlay mount of `layers` (bottom first, each a [`listing_of_tar`]) shows: later
/// layers replace entries, whiteouts delete (with everything below), opaque directories hide
/// what the layers below had in them. Whiteouts and opaque marks themselves are not shown.
pub fn merged_listing(layers: &[Listing]) -> Listing {
    let mut merged = Listing::new();
    let remove_below = |merged: &mut Listing, dir: &str| {
        let prefix = format!("{dir}/");
        merged.retain(|path, _| !path.starts_with(&prefix));
    };
    for layer in layers {
        for (path, line) in layer {
            if line.ends_with(" opaque") || line == "opaque (implicit dir)" {
                remove_below(&mut merged, path);
            }
        }
        for (path, line) in layer {
            if line == "whiteout" {
                merged.remove(path);
                remove_below(&mut merged, path);
                continue;
            }
            let line = line.trim_end_matches(" opaque").to_owned();
            if !line.starts_with("dir ") {
                remove_below(&mut merged, path);
            }
            merged.insert(path.clone(), line);
        }
    }
    merged
}
