//! Throughput check for pulls, to compare with containerd against the same local registry.
//!
//! `bench push <registry host> <repo:tag> <dir>...` pushes an image with one gzip layer per dir
//! (plain HTTP); `bench pull <reference> <store root> [plain-http host]` pulls it into a store
//! and prints the time and rate.

use std::time::Instant;

use imagestore::{ImageStore, RegistryConfig, StoreConfig};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest as _;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("push") if args.len() >= 5 => push(&args[2], &args[3], &args[4..]).await,
        Some("pull") if args.len() >= 4 => pull(&args[2], &args[3], args.get(4)).await,
        _ => eprintln!("usage: bench push <host> <repo:tag> <dir>... | bench pull <ref> <root> [plain-http host]"),
    }
}

async fn push(host: &str, name: &str, dirs: &[String]) {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for dir in dirs {
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        builder.append_dir_all(".", dir).unwrap();
        let tar = builder.into_inner().unwrap();
        diff_ids.push(format!("\"sha256:{}\"", hex::encode(sha2::Sha256::digest(&tar))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        eprintln!("layer {dir}: {} bytes, {} compressed", tar.len(), gz.len());
        layers.push(ImageLayer::new(gz, "application/vnd.oci.image.layer.v1.tar+gzip".into(), None));
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config = Config::new(config.into_bytes(), "application/vnd.oci.image.config.v1+json".into(), None);
    let client = Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() });
    let reference: Reference = format!("{host}/{name}").parse().unwrap();
    let response = client.push(&reference, &layers, config, &RegistryAuth::Anonymous, None).await.unwrap();
    eprintln!("pushed {}", response.manifest_url);
}

async fn pull(reference: &str, root: &str, plain_http: Option<&String>) {
    let mut config = StoreConfig::default();
    if let Some(host) = plain_http {
        config.registries.insert(host.clone(), RegistryConfig { plain_http: true, ..Default::default() });
    }
    let store = ImageStore::open(std::path::Path::new(root), config).unwrap();
    let started = Instant::now();
    let image = store.pull(reference, None).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("pulled {} ({} bytes) in {secs:.2}s: {:.1} MB/s", image.id, image.size, image.size as f64 / secs / 1e6);
}
