//! A small in-process registry (HTTP/1.1, distribution API subset) for unit tests: manifests,
//! blobs, basic/bearer auth with a token endpoint, injected failures, slow blobs, request counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::digest::Digest;

#[derive(Clone, Debug, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    Basic(String, String),
    /// Requests need `Bearer <token>`; the token endpoint trades `refresh` for it.
    Bearer {
        token: String,
        refresh: String,
    },
}

#[derive(Default)]
pub(crate) struct State {
    pub manifests: HashMap<(String, String), (String, Vec<u8>)>,
    pub blobs: HashMap<String, Vec<u8>>,
    pub hits: HashMap<String, usize>,
    pub requests: Vec<String>,
    pub auth: Auth,
    /// Path substring -> number of 503 answers still to give.
    pub fail: HashMap<String, usize>,
    /// Delay between 16 KiB chunks of blob bodies.
    pub blob_delay: Option<Duration>,
    /// Answer HEAD of a manifest with 405, as some registries do.
    pub no_head: bool,
    /// The OCI 1.1 referrers API: `(repo, subject digest)` -> the index to answer. A registry
    /// without any answers 404 for every subject, as registries without the API do.
    pub referrers: HashMap<(String, String), Vec<u8>>,
}

pub(crate) struct FakeRegistry {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, s, addr).await;
                });
            }
        });
        FakeRegistry { addr, state, task }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn put_blob(&self, data: &[u8]) -> Digest {
        let digest = Digest::sha256_of(data);
        self.state().blobs.insert(digest.to_string(), data.to_vec());
        digest
    }

    /// Serves other bytes under an existing digest (a lying registry or a corrupted cache).
    pub fn tamper_blob(&self, digest: &Digest, data: &[u8]) {
        self.state().blobs.insert(digest.to_string(), data.to_vec());
    }

    pub fn put_manifest(&self, repo: &str, tag: Option<&str>, media_type: &str, body: &[u8]) -> Digest {
        let digest = Digest::sha256_of(body);
        let mut st = self.state();
        st.manifests.insert((repo.into(), digest.to_string()), (media_type.into(), body.to_vec()));
        if let Some(tag) = tag {
            st.manifests.insert((repo.into(), tag.into()), (media_type.into(), body.to_vec()));
        }
        digest
    }

    pub fn hits(&self, path_part: &str) -> usize {
        self.state().hits.iter().filter(|(k, _)| k.contains(path_part)).map(|(_, v)| v).sum()
    }
}

async fn serve(conn: TcpStream, state: Arc<Mutex<State>>, addr: SocketAddr) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            read.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let mut body = vec![0; headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)];
        read.read_exact(&mut body).await?;
        let path = target.split('?').next().unwrap_or("").to_owned();
        let response = {
            let mut st = state.lock().unwrap();
            st.requests.push(format!("{method} {target}"));
            *st.hits.entry(path.clone()).or_default() += 1;
            route(&mut st, &method, &path, &headers, &body, addr)
        };
        let (status, extra, data, slow) = response;
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", data.len());
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        write.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            match slow {
                Some(delay) => {
                    for chunk in data.chunks(16 << 10) {
                        write.write_all(chunk).await?;
                        write.flush().await?;
                        tokio::time::sleep(delay).await;
                    }
                }
                None => write.write_all(&data).await?,
            }
        }
        write.flush().await?;
    }
}

type Response = (&'static str, Vec<(String, String)>, Vec<u8>, Option<Duration>);

fn route(
    st: &mut State,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    addr: SocketAddr,
) -> Response {
    let not_found = |code: &str| -> Response {
        (
            "404 Not Found",
            vec![("Content-Type".into(), "application/json".into())],
            format!(r#"{{"errors":[{{"code":"{code}","message":"not here"}}]}}"#).into_bytes(),
            None,
        )
    };
    if path == "/token" && method == "POST" {
        let form = String::from_utf8_lossy(body);
        return match &st.auth {
            Auth::Bearer { token, refresh }
                if form.contains("grant_type=refresh_token") && form.contains(&format!("refresh_token={refresh}")) =>
            {
                ("200 OK", vec![], format!(r#"{{"access_token":"{token}"}}"#).into_bytes(), None)
            }
            _ => ("401 Unauthorized", vec![], b"{}".to_vec(), None),
        };
    }
    if let Some((fragment, n)) = st.fail.iter_mut().find(|(k, n)| path.contains(k.as_str()) && **n > 0) {
        let _ = fragment;
        *n -= 1;
        return ("503 Service Unavailable", vec![], b"try later".to_vec(), None);
    }
    let authorised = match &st.auth {
        Auth::None => true,
        Auth::Basic(user, pass) => {
            use base64::Engine as _;
            let expected = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            headers.get("authorization") == Some(&format!("Basic {expected}"))
        }
        Auth::Bearer { token, .. } => headers.get("authorization") == Some(&format!("Bearer {token}")),
    };
    if !authorised {
        let challenge = match &st.auth {
            Auth::Bearer { .. } => format!(r#"Bearer realm="http://{addr}/token",service="fake""#),
            _ => r#"Basic realm="fake""#.to_owned(),
        };
        return (
            "401 Unauthorized",
            vec![("WWW-Authenticate".into(), challenge), ("Content-Type".into(), "application/json".into())],
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.to_vec(),
            None,
        );
    }
    if path == "/v2/" || path == "/v2" {
        return ("200 OK", vec![], b"{}".to_vec(), None);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return not_found("NAME_UNKNOWN");
    };
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        if method == "HEAD" && st.no_head {
            return ("405 Method Not Allowed", vec![], Vec::new(), None);
        }
        return match st.manifests.get(&(repo.to_owned(), reference.to_owned())) {
            Some((media_type, data)) => (
                "200 OK",
                vec![
                    ("Content-Type".into(), media_type.clone()),
                    ("Docker-Content-Digest".into(), Digest::sha256_of(data).to_string()),
                ],
                data.clone(),
                None,
            ),
            None => not_found("MANIFEST_UNKNOWN"),
        };
    }
    if let Some((repo, digest)) = rest.split_once("/referrers/") {
        return match st.referrers.get(&(repo.to_owned(), digest.to_owned())) {
            Some(index) => ("200 OK", vec![("Content-Type".into(), OCI_INDEX.into())], index.clone(), None),
            None => not_found("NAME_UNKNOWN"),
        };
    }
    if let Some((_repo, digest)) = rest.split_once("/blobs/") {
        return match st.blobs.get(digest) {
            Some(data) => (
                "200 OK",
                vec![("Content-Type".into(), "application/octet-stream".into())],
                data.clone(),
                st.blob_delay,
            ),
            None => not_found("BLOB_UNKNOWN"),
        };
    }
    not_found("NAME_UNKNOWN")
}

/// Pushes an image made of `layers` (uncompressed tars, gzipped here); returns (manifest digest,
/// config digest).
pub(crate) fn push_image(
    reg: &FakeRegistry,
    repo: &str,
    tag: Option<&str>,
    layers: &[Vec<u8>],
    user: &str,
    arch: &str,
) -> (Digest, Digest) {
    let gzipped: Vec<(Vec<u8>, Digest)> =
        layers.iter().map(|tar| (crate::unpack_tests::gzip(tar), Digest::sha256_of(tar))).collect();
    push_gzipped_image(reg, repo, tag, gzipped, user, arch)
}

/// Pushes an image made of already gzipped layers, each with its diff id (the tar's digest).
pub(crate) fn push_gzipped_image(
    reg: &FakeRegistry,
    repo: &str,
    tag: Option<&str>,
    layers: Vec<(Vec<u8>, Digest)>,
    user: &str,
    arch: &str,
) -> (Digest, Digest) {
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (compressed, diff_id) in layers {
        let size = compressed.len();
        let digest = Digest::sha256_of(&compressed);
        reg.state().blobs.insert(digest.to_string(), compressed);
        diff_ids.push(format!("\"{diff_id}\""));
        descriptors.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":{size}}}"#
        ));
    }
    let config = format!(
        r#"{{"architecture":"{arch}","os":"linux","config":{{"User":"{user}","Env":["PATH=/bin"],"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config_digest = reg.put_blob(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        descriptors.join(",")
    );
    let manifest_digest = reg.put_manifest(repo, tag, OCI_MANIFEST, manifest.as_bytes());
    (manifest_digest, config_digest)
}

/// Pushes an index of `(os/arch[/variant], manifest digest, manifest size)` entries.
pub(crate) fn push_index(reg: &FakeRegistry, repo: &str, tag: &str, entries: &[(&str, Digest)]) -> Digest {
    let manifests: Vec<String> = entries
        .iter()
        .map(|(platform, digest)| {
            let mut p = platform.split('/');
            let (os, arch, variant) = (p.next().unwrap(), p.next().unwrap(), p.next());
            let variant = variant.map(|v| format!(r#","variant":"{v}""#)).unwrap_or_default();
            let size = reg.state().manifests.get(&(repo.to_owned(), digest.to_string())).map(|m| m.1.len()).unwrap_or(0);
            format!(r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{size},"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}"#)
        })
        .collect();
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#, manifests.join(","));
    reg.put_manifest(repo, Some(tag), OCI_INDEX, index.as_bytes())
}

/// A layer tar with the given files.
pub(crate) fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}
