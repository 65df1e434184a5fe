//! A profiling harness for the pull path (issue 17, item 3), not a test: an image like
//! `scripts/bench pull`'s (4 gzip layers of text-like files with some incompressible ones, ~33 KB
//! per file on average) served by the in-process registry and pulled into a fresh store, with the
//! process's CPU time (/proc/self/stat) printed. Run it in release, natively or under callgrind:
//!
//! ```text
//! PULL_PROFILE_MB=200 cargo test --release -p imagestore --lib -- --ignored --nocapture profile_pull
//! valgrind --tool=callgrind target/release/deps/imagestore-<hash> --ignored --exact pull_profile::profile_pull
//! ```
//!
//! The layers are generated once into `PULL_PROFILE_DIR` (default `/tmp/imagestore-pull-profile`),
//! so that a profile shows the pull, not the gzip compression of its input. The store is made
//! there too: put it on the file system to measure. On ext4 without a journal (the test VMs'
//! root) a run soon after the previous one's store was deleted spends seconds of system CPU in
//! ext4 skipping the recently freed inodes (README, Benchmarks: pull); a loop-mounted journaled
//! ext4 image shows what a production /var/lib would.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::digest::Digest;
use crate::store::ImageStore;
use crate::test_registry::{FakeRegistry, push_gzipped_image};

/// splitmix64, as the bench's generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One layer's tar: files of text from a 1024-word vocabulary (1 in 20 random bytes), sizes
/// mostly small, some medium, a few large, 100 files per directory.
fn layer_tar(index: u64, bytes: usize) -> Vec<u8> {
    let mut rng = Rng(0x5eed_0000 + index);
    let words: Vec<Vec<u8>> = (0..1024)
        .map(|_| {
            let len = 2 + rng.below(10) as usize;
            (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect();
    let mut builder = tar::Builder::new(Vec::new());
    let (mut total, mut files) = (0usize, 0usize);
    while total < bytes {
        let size = match rng.below(1000) {
            0..900 => 512 + rng.below(16 << 10) as usize,
            900..995 => (16 << 10) + rng.below(240 << 10) as usize,
            _ => (1 << 20) + rng.below(3 << 20) as usize,
        }
        .min(bytes - total)
        .max(1);
        let mut data = Vec::with_capacity(size + 16);
        if rng.below(20) == 0 {
            while data.len() < size {
                data.extend_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            while data.len() < size {
                let r = rng.next();
                data.extend_from_slice(&words[(r & 1023) as usize]);
                data.push(if (r >> 10).is_multiple_of(12) { b'\n' } else { b' ' });
            }
        }
        data.truncate(size);
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(size as u64);
        header.set_mtime(1_600_000_000);
        let path = format!("usr/share/bench{index}/d{:03}/f{files:05}", files / 100);
        builder.append_data(&mut header, path, &data[..]).unwrap();
        total += size;
        files += 1;
    }
    builder.into_inner().unwrap()
}

/// (gzip blob, the tar's digest) of layer `i`, generated once.
fn layer(dir: &Path, i: u64, bytes: usize) -> (Vec<u8>, Digest) {
    let (blob_path, diff_id_path) = (dir.join(format!("layer{i}.tar.gz")), dir.join(format!("layer{i}.diffid")));
    if let (Ok(blob), Ok(diff_id)) = (fs::read(&blob_path), fs::read_to_string(&diff_id_path)) {
        return (blob, diff_id.trim().parse().unwrap());
    }
    let tar = layer_tar(i, bytes);
    let (blob, diff_id) = (crate::unpack_tests::gzip(&tar), Digest::sha256_of(&tar));
    fs::write(&blob_path, &blob).unwrap();
    fs::write(&diff_id_path, diff_id.to_string()).unwrap();
    (blob, diff_id)
}

/// This process's (user, system) CPU seconds, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_seconds() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks = |i: usize| fields[i].parse::<f64>().unwrap() / 100.0;
    (ticks(11), ticks(12))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a profiling harness: run by hand, in release"]
async fn profile_pull() {
    let mb: usize = std::env::var("PULL_PROFILE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = PathBuf::from(
        std::env::var("PULL_PROFILE_DIR").unwrap_or_else(|_| format!("/tmp/imagestore-pull-profile-{mb}mb")),
    );
    fs::create_dir_all(&dir).unwrap();
    let reg = FakeRegistry::start().await;
    let layers: Vec<(Vec<u8>, Digest)> = (0..4).map(|i| layer(&dir, i, mb * 1_000_000 / 4)).collect();
    let compressed: usize = layers.iter().map(|(blob, _)| blob.len()).sum();
    let arch = crate::platform::Platform::host().architecture;
    push_gzipped_image(&reg, "bench", Some("1"), layers, "", &arch);

    let root = tempfile::tempdir_in(&dir).unwrap();
    let mut config = crate::config::StoreConfig::default();
    config.registries.insert(reg.host(), crate::config::RegistryConfig { plain_http: true, ..Default::default() });
    let store = ImageStore::open(root.path(), config).unwrap();
    let (user0, sys0) = cpu_seconds();
    let started = Instant::now();
    let image = store.pull(&format!("{}/bench:1", reg.host()), None).await.unwrap();
    let wall = started.elapsed().as_secs_f64();
    let (user1, sys1) = cpu_seconds();
    println!(
        "pulled {:.1} MB ({:.1} MB gzip) in {wall:.2} s: CPU user {:.2} s, sys {:.2} s",
        image.size as f64 / 1e6,
        compressed as f64 / 1e6,
        user1 - user0,
        sys1 - sys0
    );
}
