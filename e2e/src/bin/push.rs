//! `push`: pushes an image to a plain-HTTP registry reachable from the current network namespace,
//! e.g. a `docker-registry` on 127.0.0.1:5000 inside the cgroup v2 VM (e2e/vm), where the tests
//! cannot push from their own process. Waits up to 30 s for the registry to answer first.
//!
//!   push HOST:PORT REPO:TAG [LAYOUT]     prints HOST:PORT/REPO:TAG
//!
//! The image is the e2e busybox image (`e2e::oci::busybox_image`, built from the host's
//! busybox-static), or the one manifest of the OCI image layout directory LAYOUT (index.json,
//! blobs/sha256/...). A layout written by the test process saves building the image inside a slow
//! VM: gzip and sha256 of a debug build under TCG take over ten seconds.

use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::oci::{Blob, MEDIA_MANIFEST, busybox_image};
use e2e::registry::{Response, http_on};

#[derive(Debug)]
struct Target {
    host: String,
    repo: String,
}

impl Target {
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Response, String> {
        let stream = TcpStream::connect(&self.host).map_err(|e| format!("cannot connect to {}: {e}", self.host))?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        http_on(stream, &self.host, method, path, headers, body).map_err(|e| format!("{method} {path}: {e}"))
    }

    fn expect(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        want: u16,
    ) -> Result<Response, String> {
        let response = self.request(method, path, headers, body)?;
        if response.status != want {
            return Err(format!(
                "{method} {path}: HTTP {} (want {want}): {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            ));
        }
        Ok(response)
    }

    /// A monolithic blob upload, unless the registry has the blob already.
    fn push_blob(&self, blob: &Blob) -> Result<(), String> {
        if self.request("HEAD", &format!("/v2/{}/blobs/{}", self.repo, blob.digest), &[], b"")?.status == 200 {
            return Ok(());
        }
        let started = self.expect("POST", &format!("/v2/{}/blobs/uploads/", self.repo), &[], b"", 202)?;
        let location = started.header("Location").ok_or("upload without a Location")?;
        let path = &location[location.find("/v2/").ok_or_else(|| format!("odd upload location {location}"))?..];
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = format!("{path}{sep}digest={}", blob.digest);
        self.expect("PUT", &put, &[("Content-Type", "application/octet-stream")], &blob.data, 201)?;
        Ok(())
    }
}

/// The manifest (first in index.json) of an OCI image layout, and the blobs it names.
fn read_layout(dir: &Path) -> Result<(Blob, Vec<Blob>), String> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let json = |data: &[u8], what: &str| {
        serde_json::from_slice::<serde_json::Value>(data).map_err(|e| format!("{what} in {}: {e}", dir.display()))
    };
    let blob = |descriptor: &serde_json::Value| -> Result<Blob, String> {
        let digest = descriptor["digest"].as_str().ok_or("a descriptor without a digest")?;
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("not a sha256 digest: {digest}"))?;
        let media_type = descriptor["mediaType"].as_str().unwrap_or(MEDIA_MANIFEST);
        let blob = Blob::new(media_type, read(&dir.join("blobs/sha256").join(hex))?);
        if blob.digest != digest {
            return Err(format!("blob {digest} in {} has digest {}", dir.display(), blob.digest));
        }
        Ok(blob)
    };
    let index = json(&read(&dir.join("index.json"))?, "index.json")?;
    let manifest = blob(&index["manifests"][0])?;
    let parsed = json(&manifest.data, "the manifest")?;
    let mut blobs = Vec::new();
    for layer in parsed["layers"].as_array().ok_or("a manifest without layers")? {
        blobs.push(blob(layer)?);
    }
    blobs.push(blob(&parsed["config"])?);
    Ok((manifest, blobs))
}

fn push(host: &str, reference: &str, layout: Option<&Path>) -> Result<String, String> {
    let (repo, tag) = reference.split_once(':').ok_or("want REPO:TAG")?;
    let target = Target { host: host.to_owned(), repo: repo.to_owned() };
    let (manifest, blobs) = match layout {
        Some(dir) => read_layout(dir)?,
        None => {
            let image = busybox_image("");
            let mut blobs: Vec<Blob> = image.layers.iter().map(|l| l.blob.clone()).collect();
            blobs.push(image.config);
            (image.manifest, blobs)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match target.request("GET", "/v2/", &[], b"") {
            Ok(r) if r.status == 200 => break,
            result if Instant::now() > deadline => return Err(format!("registry {host} does not answer: {result:?}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    for blob in &blobs {
        target.push_blob(blob)?;
    }
    target.expect(
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Content-Type", &manifest.media_type)],
        &manifest.data,
        201,
    )?;
    Ok(format!("{host}/{repo}:{tag}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (host, reference, layout) = match args.as_slice() {
        [host, reference] => (host, reference, None),
        [host, reference, layout] => (host, reference, Some(Path::new(layout))),
        _ => {
            eprintln!("usage: push HOST:PORT REPO:TAG [OCI-LAYOUT-DIR]");
            return ExitCode::from(2);
        }
    };
    match push(host, reference, layout) {
        Ok(pushed) => {
            println!("{pushed}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("push: {e}");
            ExitCode::FAILURE
        }
    }
}
