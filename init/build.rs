//! `INIT_BUILD_ID`: a fingerprint of this crate's sources, shared by the daemon (which links this
//! crate) and `cri-systemd-init` (this crate's binary). The daemon runs the helper only when the two
//! match, so a helper left from another build never reads an `init.json` it does not know.

use std::path::Path;

fn main() {
    let mut files = Vec::new();
    collect(Path::new("src"), &mut files);
    files.push(Path::new("Cargo.toml").to_path_buf());
    files.sort();
    // FNV-1a over every file's path and contents: stable across builds and compilers.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in &files {
        let contents = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for byte in file.to_string_lossy().as_bytes().iter().chain(&[0]).chain(&contents) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=INIT_BUILD_ID={}-{hash:016x}", std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}
