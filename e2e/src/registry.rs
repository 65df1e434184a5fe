//! Real registries inside a test node: Debian's `docker-registry` (distribution 2.8) started as a
//! transient unit, listening on the node's loopback, with storage of its own under
//! `/srv/e2e-registry/<name>` in the node (the node's tmpfs overlay upper: gone with the node).
//!
//! The tests push to it from their own process: [`connect_in_node`] opens a TCP socket from a
//! thread that joined the node's network namespace, so every byte stays on the node's loopback.
//! [`Registry::push_image`] and friends speak the distribution API over such sockets with a
//! minimal HTTP/1.1 client (monolithic blob uploads, manifest PUTs).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::Node;
use crate::oci::{Blob, Image, Index};

/// The host PID of the node's PID 1.
pub fn node_pid1(node: &Node) -> u32 {
    let output = std::process::Command::new(crate::node_command())
        .args(["pid", node.name()])
        .output()
        .expect("cannot run e2e/node pid");
    assert!(output.status.success(), "e2e/node pid {}: {}", node.name(), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().parse().expect("e2e/node pid prints a pid")
}

/// A node's network namespace, for sockets opened from the test process: a socket keeps the
/// namespace it was created in for its whole life, whichever thread then uses it.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pid1: u32,
}

impl NodeNet {
    pub fn of(node: &Node) -> NodeNet {
        NodeNet { pid1: node_pid1(node) }
    }

    /// The host PID of the node's PID 1.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// Runs `f` on a new thread that joined the node's network namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
        let netns = File::open(format!("/proc/{}/ns/net", self.pid1))?;
        std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// A TCP connection to `addr` (e.g. `127.0.0.1:5000`) in the node.
    pub fn connect(&self, addr: &str) -> io::Result<TcpStream> {
        let addr = addr.to_owned();
        self.run(move || {
            let stream = TcpStream::connect(&addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            Ok(stream)
        })
    }

    /// One HTTP/1.1 request (`Connection: close`) to `addr` in the node.
    pub fn http(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        http_on(self.connect(addr)?, addr, method, path, headers, body)
    }
}

/// One HTTP/1.1 request (`Connection: close`) over `stream`, a connection to `addr` (wherever it
/// was opened: in a node, or in the current network namespace, as inside the cgroup v2 VM).
pub fn http_on(
    mut stream: TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {TEST_USER_AGENT}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Opens a TCP connection to `addr` inside the node's network namespace.
pub fn connect_in_node(node: &Node, addr: &str) -> io::Result<TcpStream> {
    NodeNet::of(node).connect(addr)
}

/// One HTTP/1.1 request to `addr` inside the node's network namespace.
pub fn http(
    node: &Node,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    NodeNet::of(node).http(addr, method, path, headers, body)
}

/// An HTTP response, body read in full.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The User-Agent of the tests' own requests, which [`Registry::access_lines`] leaves out.
pub const TEST_USER_AGENT: &str = "cri-systemd-e2e";

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP header in {:?}", String::from_utf8_lossy(raw))))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Ok(Response { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..end]).split(';').next().unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// How a registry is set up.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password (an htpasswd file with a bcrypt entry).
    pub basic_auth: Option<(String, String)>,
}

/// A `docker-registry` running in a node. Stopped with the node.
#[derive(Debug)]
pub struct Registry<'n> {
    node: &'n Node,
    net: NodeNet,
    name: String,
    port: u16,
    dir: String,
    auth: Option<String>,
}

impl<'n> Registry<'n> {
    /// Starts registry `name` on 127.0.0.1:`port` in the node and waits until it answers.
    pub fn start(node: &'n Node, name: &str, port: u16, options: RegistryOptions) -> Registry<'n> {
        let dir = format!("/srv/e2e-registry/{name}");
        let mut auth_section = String::new();
        let mut auth = None;
        if let Some((user, password)) = &options.basic_auth {
            let hash = bcrypt::hash(password, 4).expect("bcrypt");
            node.write_file(&format!("{dir}/htpasswd"), &format!("{user}:{hash}\n"));
            auth_section = format!("auth:\n  htpasswd:\n    realm: e2e-{name}\n    path: {dir}/htpasswd\n");
            auth = Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        }
        // No blob descriptor cache: what is on disk is what is served (see `tamper_blob`).
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {dir}/data\n  delete:\n    enabled: true\n  redirect:\n    disable: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: e2e-{name}-not-secret\n\
             {auth_section}"
        );
        node.write_file(&format!("{dir}/config.yml"), &config);
        let unit = format!("e2e-registry-{name}");
        node.sh(&format!(
            "systemd-run --quiet --unit={unit} -p Type=exec /usr/bin/docker-registry serve {dir}/config.yml"
        ));
        let registry = Registry { node, net: NodeNet::of(node), name: name.to_owned(), port, dir, auth };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match registry.request("GET", "/v2/", &[], b"") {
                Ok(r) if r.status == 200 || r.status == 401 => break,
                result => {
                    assert!(
                        Instant::now() < deadline,
                        "registry {name} does not answer on 127.0.0.1:{port}: {result:?}\n{}",
                        registry.logs()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        registry
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>/<repo>`
    pub fn repo(&self, repo: &str) -> String {
        format!("{}/{repo}", self.host())
    }

    /// The unit running the registry in the node.
    pub fn unit(&self) -> String {
        format!("e2e-registry-{}", self.name)
    }

    /// Its storage directory in the node.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// A request to the registry, with its credentials if it has any.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
        let authorization;
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(auth) = &self.auth {
            authorization = format!("Basic {auth}");
            all.push(("Authorization", &authorization));
        }
        self.net.http(&self.host(), method, path, &all, body)
    }

    fn expect(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], want: u16) -> Response {
        let response = self
            .request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.name));
        assert_eq!(response.status, want, "{method} {path} on registry {}: {}", self.name, response.text());
        response
    }

    /// Uploads a blob to `repo` (monolithic upload), unless the registry has it already.
    pub fn push_blob(&self, repo: &str, blob: &Blob) {
        let head = self.request("HEAD", &format!("/v2/{repo}/blobs/{}", blob.digest), &[], b"").unwrap();
        if head.status == 200 {
            return;
        }
        let started = self.expect("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"", 202);
        let location = started.header("Location").expect("upload Location").to_owned();
        let path = match location.find("/v2/") {
            Some(i) => location[i..].to_owned(),
            None => panic!("odd upload location {location}"),
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        self.expect(
            "PUT",
            &format!("{path}{sep}digest={}", blob.digest),
            &[("Content-Type", "application/octet-stream")],
            &blob.data,
            201,
        );
    }

    /// PUTs a manifest or index under `reference` (a tag or its digest).
    pub fn push_manifest(&self, repo: &str, reference: &str, manifest: &Blob) {
        self.expect(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", &manifest.media_type)],
            &manifest.data,
            201,
        );
    }

    /// Pushes an image's blobs and manifest, tagged `tag`. Returns `<host>/<repo>:<tag>`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) -> String {
        self.push_image_blobs(repo, image);
        self.push_manifest(repo, tag, &image.manifest);
        format!("{}:{tag}", self.repo(repo))
    }

    fn push_image_blobs(&self, repo: &str, image: &Image) {
        for layer in &image.layers {
            self.push_blob(repo, &layer.blob);
        }
        self.push_blob(repo, &image.config);
    }

    /// Pushes every image of the index (by digest), then the index tagged `tag`.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Index) -> String {
        for image in &index.images {
            self.push_image_blobs(repo, image);
            self.push_manifest(repo, &image.manifest.digest, &image.manifest);
        }
        self.push_manifest(repo, tag, &index.manifest);
        format!("{}:{tag}", self.repo(repo))
    }

    /// The registry's journal (its log and access log).
    pub fn logs(&self) -> String {
        self.node.exec(&["journalctl", "-u", &self.unit(), "--no-pager", "-o", "cat"]).stdout
    }

    /// Access-log lines (combined log format) of requests containing `needle`, e.g.
    /// `"GET /v2/e2e/x/blobs/sha256:...`, leaving out the tests' own requests (pushes).
    pub fn access_lines(&self, needle: &str) -> Vec<String> {
        let ours = format!("\"{TEST_USER_AGENT}\"");
        self.logs()
            .lines()
            .filter(|l| l.starts_with("127.0.0.1 - ") && l.contains(needle) && !l.ends_with(&ours))
            .map(str::to_owned)
            .collect()
    }

    /// How many times the blob was served (GET answered 200 or 206).
    pub fn blob_downloads(&self, repo: &str, digest: &str) -> usize {
        self.access_lines(&format!("\"GET /v2/{repo}/blobs/{digest}"))
            .iter()
            .filter(|l| l.contains("\" 200 ") || l.contains("\" 206 "))
            .count()
    }

    /// Replaces the stored content of a blob behind the registry's back (the registry serves
    /// files as they are on disk). `data` should have the blob's size, so that only the digest
    /// is wrong.
    pub fn tamper_blob(&self, digest: &str, data: &[u8]) {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let path = format!("{}/data/docker/registry/v2/blobs/sha256/{}/{hex}/data", self.dir, &hex[..2]);
        self.node.sh(&format!("test -f {path}"));
        let host_path = format!("/proc/{}/root{path}", self.net.pid1());
        std::fs::write(&host_path, data).unwrap_or_else(|e| panic!("write {host_path}: {e}"));
    }

    /// Stops the registry (it stays stopped).
    pub fn stop(&self) {
        self.node.sh(&format!("systemctl stop {}", self.unit()));
    }
}

/// A TCP proxy in a node that forwards to a registry, and records what clients sent it. It
/// listens on 127.0.0.1:`port` in the node and connects to `target` there; the test process only
/// moves bytes between two sockets of the node's namespace. Stops accepting when dropped; open
/// connections end when either side closes.
///
/// [`Proxy::throttled`]: a slow registry, so that a pull reliably takes long enough to be
/// interrupted (deadline, SIGKILL) or overlapped, however fast the daemon is. [`Proxy::start`]
/// at full speed: a mirror whose requests (e.g. their `Authorization` headers) a test reads.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Every byte clients sent, all connections together.
    requests: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Proxy {
    /// A proxy at full speed.
    pub fn start(node: &Node, port: u16, target: &str) -> Proxy {
        Proxy::spawn(node, port, target, None)
    }

    /// A proxy sending at most `bytes_per_sec` from the server to the clients, all connections together.
    pub fn throttled(node: &Node, port: u16, target: &str, bytes_per_sec: u64) -> Proxy {
        Proxy::spawn(node, port, target, Some(bytes_per_sec))
    }

    fn spawn(node: &Node, port: u16, target: &str, bytes_per_sec: Option<u64>) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        let net = NodeNet::of(node);
        let listener = net
            .run(move || {
                let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port} in node {}: {e}", node.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (target, stop_c, requests_c) = (target.to_owned(), stop.clone(), requests.clone());
        // When the link is free again: every chunk sent books its time on it, so the rate holds
        // from the first byte on, without a burst after idle time.
        let free_at = Arc::new(Mutex::new(Instant::now()));
        let thread = std::thread::spawn(move || {
            while !stop_c.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => break,
                };
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = net.connect(&target) else { continue };
                let _ = upstream.set_read_timeout(None);
                let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else { continue };
                let requests = requests_c.clone();
                std::thread::spawn(move || pipe(client, upstream, None, Some(requests)));
                let throttle = bytes_per_sec.map(|rate| (free_at.clone(), rate));
                std::thread::spawn(move || pipe(upstream2, client2, throttle, None));
            }
        });
        Proxy { port, stop, thread: Some(thread), requests }
    }

    /// `127.0.0.1:<port>`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What clients sent so far (request lines, headers and bodies of all connections), as text.
    pub fn requests(&self) -> String {
        String::from_utf8_lossy(&self.requests.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

type Throttle = (std::sync::Arc<std::sync::Mutex<Instant>>, u64);

/// Copies `from` to `to` until EOF or an error, then shuts both down; with a throttle, keeps all
/// the pipes sharing it under its rate; with a record, appends what it copies to it.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    throttle: Option<Throttle>,
    record: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
) {
    let mut buffer = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((free_at, rate)) = &throttle {
            let done = {
                let mut free_at = free_at.lock().unwrap_or_else(|p| p.into_inner());
                *free_at = (*free_at).max(Instant::now()) + Duration::from_secs_f64(n as f64 / *rate as f64);
                *free_at
            };
            std::thread::sleep(done.saturating_duration_since(Instant::now()));
        }
        if let Some(record) = &record {
            record.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buffer[..n]);
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---- cosign signatures ------------------------------------------------------------------------
//
// Signatures made in the tests with throwaway keys, in exactly the format cosign pushes (sigstore/
// cosign specs/SIGNATURE_SPEC.md; sigstore's `payload.Cosign` for the payload's JSON): the
// simple-signing payload as a layer blob of media type `application/vnd.dev.cosign.simplesigning.v1+json`,
// its base64 signature in the layer annotation `dev.cosignproject.cosign/signature`, in an OCI
// manifest tagged `sha256-<hex>.sig` (or, in cosign's OCI 1.1 referrers mode, a manifest whose
// `subject` is the signed manifest).

/// The payload layer's media type.
pub const COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a layer's signature.
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of signature manifests in cosign's referrers mode.
pub const COSIGN_SIG_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// A throwaway signing key of one of cosign's schemes.
#[derive(Debug, Clone)]
pub enum SigningKey {
    /// ECDSA P-256 with SHA-256, ASN.1 DER signatures (`cosign generate-key-pair`'s keys).
    P256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl SigningKey {
    /// A P-256 key from a seed byte (deterministic, for tests only).
    pub fn p256(seed: u8) -> SigningKey {
        SigningKey::P256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("a valid P-256 scalar"))
    }

    /// An Ed25519 key from a seed byte (deterministic, for tests only).
    pub fn ed25519(seed: u8) -> SigningKey {
        SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }

    /// The public key as PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as `cosign.pub` holds it.
    pub fn public_pem(&self) -> String {
        match self {
            SigningKey::P256(key) => {
                use p256::pkcs8::EncodePublicKey as _;
                key.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap()
            }
            SigningKey::Ed25519(key) => {
                use ed25519_dalek::pkcs8::EncodePublicKey as _;
                key.verifying_key().to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).unwrap()
            }
        }
    }

    /// The signature of `payload` as sigstore's signers make it.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        match self {
            SigningKey::P256(key) => {
                use p256::ecdsa::signature::Signer as _;
                let signature: p256::ecdsa::Signature = key.sign(payload);
                signature.to_der().as_bytes().to_vec()
            }
            SigningKey::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                key.sign(payload).to_bytes().to_vec()
            }
        }
    }
}

/// cosign's simple-signing payload for a manifest digest and the repository it was signed as,
/// byte for byte as `payload.Cosign` marshals it (no annotations: `optional` is null).
pub fn cosign_payload(manifest_digest: &str, docker_reference: &str) -> Vec<u8> {
    format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{docker_reference}"}},"image":{{"docker-manifest-digest":"{manifest_digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    )
    .into_bytes()
}

/// One signature: a payload and the raw signature bytes over it.
#[derive(Debug, Clone)]
pub struct CosignSignature {
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

impl CosignSignature {
    /// `key`'s signature of `manifest_digest` as `docker_reference` (a repository, as cosign signs).
    pub fn new(key: &SigningKey, manifest_digest: &str, docker_reference: &str) -> CosignSignature {
        let payload = cosign_payload(manifest_digest, docker_reference);
        CosignSignature { signature: key.sign(&payload), payload }
    }
}

/// The blobs (payloads, config) and manifest of a cosign signature image. `subject`: the signed
/// manifest's descriptor, for the referrers mode (artifact type and subject set, as cosign's
/// `WriteSignaturesExperimentalOCI` writes them).
pub fn cosign_signature_image(signatures: &[CosignSignature], subject: Option<&Blob>) -> (Vec<Blob>, Blob) {
    use base64::Engine as _;
    let payloads: Vec<Blob> = signatures.iter().map(|s| Blob::new(COSIGN_SIMPLESIGNING, s.payload.clone())).collect();
    // go-containerregistry's empty image with the payloads appended (uncompressed: diff id = digest).
    let config = serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": payloads.iter().map(|_| serde_json::json!({"created": "0001-01-01T00:00:00Z"})).collect::<Vec<_>>(),
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": payloads.iter().map(|p| p.digest.clone()).collect::<Vec<_>>()},
        "config": {},
    });
    let config_media_type = if subject.is_some() { COSIGN_SIG_ARTIFACT_TYPE } else { crate::oci::MEDIA_CONFIG };
    let config = Blob::new(config_media_type, serde_json::to_vec(&config).unwrap());
    let layers: Vec<serde_json::Value> = payloads
        .iter()
        .zip(signatures)
        .map(|(blob, s)| {
            let mut descriptor = blob.descriptor();
            descriptor["annotations"] = serde_json::json!({
                COSIGN_SIGNATURE_ANNOTATION: base64::engine::general_purpose::STANDARD.encode(&s.signature)
            });
            descriptor
        })
        .collect();
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::MEDIA_MANIFEST,
        "config": config.descriptor(),
        "layers": layers,
    });
    if let Some(subject) = subject {
        manifest["subject"] = subject.descriptor();
        manifest["artifactType"] = COSIGN_SIG_ARTIFACT_TYPE.into();
    }
    let manifest = Blob::new(crate::oci::MEDIA_MANIFEST, serde_json::to_vec(&manifest).unwrap());
    let mut blobs = payloads;
    blobs.push(config);
    (blobs, manifest)
}

/// `sha256-<hex>` of a digest, with `suffix` (cosign's tag: `.sig`).
pub fn digest_tag(digest: &str, suffix: &str) -> String {
    format!("{}{suffix}", digest.replacen(':', "-", 1))
}

impl Registry<'_> {
    /// Pushes signatures of `manifest_digest` to `repo` as `cosign sign` does: a signature image
    /// tagged `sha256-<hex>.sig`. Returns the signature manifest.
    pub fn push_cosign_signatures(&self, repo: &str, manifest_digest: &str, signatures: &[CosignSignature]) -> Blob {
        let (blobs, manifest) = cosign_signature_image(signatures, None);
        for blob in &blobs {
            self.push_blob(repo, blob);
        }
        self.push_manifest(repo, &digest_tag(manifest_digest, ".sig"), &manifest);
        manifest
    }

    /// Pushes signatures of `subject` as cosign's OCI 1.1 referrers mode does on a registry
    /// without the referrers API (go-containerregistry then keeps the referrers tag schema's index
    /// under `sha256-<hex>`): the signature manifest by digest, and that index listing it.
    pub fn push_cosign_referrer(&self, repo: &str, subject: &Blob, signatures: &[CosignSignature]) -> Blob {
        let (blobs, manifest) = cosign_signature_image(signatures, Some(subject));
        for blob in &blobs {
            self.push_blob(repo, blob);
        }
        self.push_manifest(repo, &manifest.digest, &manifest);
        let mut entry = manifest.descriptor();
        entry["artifactType"] = COSIGN_SIG_ARTIFACT_TYPE.into();
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": crate::oci::MEDIA_INDEX, "manifests": [entry]});
        let index = Blob::new(crate::oci::MEDIA_INDEX, serde_json::to_vec(&index).unwrap());
        self.push_manifest(repo, &digest_tag(&subject.digest, ""), &index);
        manifest
    }
}
