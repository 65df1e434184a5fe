//! The CRI `ImageService`: translates CRI image calls into `imagestore` calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use imagestore::{Credentials, Image, ImageStore};
use proto::cri::{self, image_service_server::ImageService};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::node::Node;

/// Serves `runtime.v1.ImageService` from the node's [`ImageStore`].
#[derive(Debug)]
pub struct Images {
    store: ImageStore,
    node: Arc<Node>,
}

impl Images {
    pub fn new(node: Arc<Node>) -> Self {
        Images { store: node.images().clone(), node }
    }
}

pub use crate::errors::image_status;

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(Status::invalid_argument("image spec is missing or has an empty image")),
    }
}

/// kubelet reads an image's USER from `uid` when numeric, else from `username`; only the user
/// part of `user:group` counts.
fn user_fields(user: &str) -> (Option<cri::Int64Value>, String) {
    let user = user.split(':').next().unwrap_or("");
    if user.is_empty() {
        return (None, String::new());
    }
    match user.parse::<i64>() {
        Ok(uid) => (Some(cri::Int64Value { value: uid }), String::new()),
        Err(_) => (None, user.to_owned()),
    }
}

fn to_cri(image: &Image) -> cri::Image {
    let (uid, username) = user_fields(&image.config.user);
    cri::Image {
        id: image.id.to_string(),
        repo_tags: image.repo_tags.clone(),
        repo_digests: image.repo_digests.clone(),
        size: image.size,
        uid,
        username,
        spec: Some(cri::ImageSpec { image: image.id.to_string(), ..Default::default() }),
        pinned: image.pinned,
    }
}

/// The CRI `AuthConfig` as store credentials: a registry token is used as is, then
/// username/password, an identity token, and docker's base64 `auth` field.
fn credentials(auth: Option<&cri::AuthConfig>) -> Result<Option<Credentials>, Status> {
    let Some(auth) = auth else { return Ok(None) };
    Ok(if !auth.registry_token.is_empty() {
        Some(Credentials::RegistryToken(auth.registry_token.clone()))
    } else if !auth.username.is_empty() {
        Some(Credentials::Basic { username: auth.username.clone(), password: auth.password.clone() })
    } else if !auth.identity_token.is_empty() {
        Some(Credentials::IdentityToken(auth.identity_token.clone()))
    } else if !auth.auth.is_empty() {
        Some(Credentials::from_docker_auth(&auth.auth).map_err(image_status)?)
    } else {
        None
    })
}

/// Below this a pull cannot even reach a registry.
const MIN_PULL_DEADLINE: Duration = Duration::from_millis(10);

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, imagestore::Error> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("image store task failed: {e}")))?
        .map_err(image_status)
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let store = &self.store;
        let filter = request.get_ref().filter.as_ref().and_then(|f| f.image.as_ref()).map(|s| s.image.trim());
        let images = match filter {
            Some(name) if !name.is_empty() => store.image(name).map_err(image_status)?.into_iter().collect(),
            _ => store.images().map_err(image_status)?,
        };
        Ok(Response::new(cri::ListImagesResponse { images: images.iter().map(to_cri).collect() }))
    }

    /// cri-api 1.36: ListImages's answer as a stream (see list_streaming.rs).
    type StreamImagesStream = crate::list_streaming::ListStream<cri::StreamImagesResponse>;
    async fn stream_images(
        &self,
        request: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let list = cri::ListImagesRequest { filter: request.into_inner().filter };
        let images = self.list_images(Request::new(list)).await?.into_inner().images;
        Ok(Response::new(crate::list_streaming::chunked(images, |images| cri::StreamImagesResponse { images })))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let store = &self.store;
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let Some(image) = store.image(name).map_err(image_status)? else {
            // Absent is an answer, not an error: kubelet then pulls.
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if request.verbose {
            let config = store.config_json(&image.id).map_err(image_status)?;
            let config: serde_json::Value =
                config.and_then(|c| serde_json::from_slice(&c).ok()).unwrap_or(serde_json::Value::Null);
            let verbose = serde_json::json!({
                "imageSpec": config,
                "manifestDigest": image.manifest_digest.to_string(),
                "chainID": image.layers.last().map(|l| l.chain_id.to_string()),
                "layers": image.layers.iter().map(|l| serde_json::json!({
                    "digest": l.digest.to_string(), "size": l.size, "mediaType": l.media_type,
                    "diffID": l.diff_id.to_string(),
                })).collect::<Vec<_>>(),
            });
            info.insert("info".to_owned(), verbose.to_string());
        }
        Ok(Response::new(cri::ImageStatusResponse { image: Some(to_cri(&image)), info }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let store = &self.store;
        let deadline = grpc_timeout(&request);
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?.to_owned();
        let auth = credentials(request.auth.as_ref())?;
        info!(image = %name, authenticated = auth.is_some(), ?deadline, "pulling image");
        let pull = store.pull(&name, auth);
        let counted = crate::prometheus::metrics().pull_started();
        let image = match deadline {
            None => pull.await,
            Some(deadline) if deadline < MIN_PULL_DEADLINE => {
                // No registry round trip fits: say so at once instead of starting work that
                // cannot finish (and before the client's own timer fires).
                counted.finished(Some("deadline_exceeded"));
                return Err(Status::deadline_exceeded(format!(
                    "a {deadline:?} deadline is too short to pull image {name:?}"
                )));
            }
            Some(deadline) => {
                // Answer a little before the client gives up, so it hears DeadlineExceeded and not
                // its own cancellation; dropping the pull future undoes it (the store is cancel-safe).
                let ours = deadline.saturating_sub((deadline / 5).min(Duration::from_millis(200)));
                match tokio::time::timeout(ours, pull).await {
                    Ok(result) => result,
                    Err(_) => {
                        counted.finished(Some("deadline_exceeded"));
                        return Err(Status::deadline_exceeded(format!(
                            "pulling image {name:?} did not finish within the {deadline:?} deadline"
                        )));
                    }
                }
            }
        };
        counted.finished(image.as_ref().err().map(imagestore::Error::reason));
        let image = image.map_err(image_status)?;
        Ok(Response::new(cri::PullImageResponse { image_ref: image.id.to_string() }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let name = image_name(request.get_ref().image.as_ref())?;
        self.node.remove_image(name).await.map_err(crate::errors::node_status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let store = self.store.clone();
        let writable_layers = self.node.writable_layers_dir();
        let (usage, split) = blocking(move || {
            let usage = store.usage()?;
            // Only a writable layers' directory on a file system of its own gets an entry of its own.
            let split = on_another_filesystem(&usage.mountpoint, &writable_layers)
                .then(|| (runtime::stats::disk_usage(&writable_layers), writable_layers));
            Ok((usage, split))
        })
        .await?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let filesystem = cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier { mountpoint: usage.mountpoint.display().to_string() }),
            used_bytes: Some(cri::UInt64Value { value: usage.used_bytes }),
            inodes_used: Some(cri::UInt64Value { value: usage.inodes_used }),
        };
        // KEP-4191: the kubelet takes a container filesystem whose mountpoint differs from the
        // image filesystem's as a split disk (cadvisor stats provider; with KubeletSeparateDiskGC it
        // errs without one). On one file system it is the image filesystem's own entry, as CRI-O
        // answers; on another, that directory with the writable layers' use.
        let container_filesystem = match split {
            None => filesystem.clone(),
            Some((used, dir)) => cri::FilesystemUsage {
                timestamp,
                fs_id: Some(cri::FilesystemIdentifier { mountpoint: dir.display().to_string() }),
                used_bytes: Some(cri::UInt64Value { value: used.bytes }),
                inodes_used: Some(cri::UInt64Value { value: used.inodes }),
            },
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![filesystem],
            container_filesystems: vec![container_filesystem],
        }))
    }
}

/// Whether `dir` is on another file system than `image_root` (a directory that cannot be read
/// counts as the same: a split disk is never claimed without seeing one).
fn on_another_filesystem(image_root: &std::path::Path, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(image_root), std::fs::metadata(dir)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str) -> Option<cri::ImageSpec> {
        Some(cri::ImageSpec { image: image.into(), ..Default::default() })
    }

    #[test]
    fn a_split_disk_only_where_the_device_differs() {
        use std::path::Path;
        assert!(on_another_filesystem(Path::new("/"), Path::new("/proc")));
        assert!(!on_another_filesystem(Path::new("/"), Path::new("/")));
        assert!(!on_another_filesystem(Path::new("/"), Path::new("/no/such/directory")));
    }

    #[test]
    fn user_maps_as_kubelet_reads_it() {
        assert_eq!(user_fields("1002"), (Some(cri::Int64Value { value: 1002 }), String::new()));
        assert_eq!(user_fields("www-data"), (None, "www-data".to_owned()));
        assert_eq!(user_fields("1003:1004"), (Some(cri::Int64Value { value: 1003 }), String::new()));
        assert_eq!(user_fields("www-data:1004"), (None, "www-data".to_owned()));
        assert_eq!(user_fields("0"), (Some(cri::Int64Value { value: 0 }), String::new()));
        assert_eq!(user_fields(""), (None, String::new()));
    }

    #[test]
    fn credentials_and_deadlines() {
        assert_eq!(credentials(None).unwrap(), None);
        let auth = |f: fn(&mut cri::AuthConfig)| {
            let mut a = cri::AuthConfig::default();
            f(&mut a);
            credentials(Some(&a)).unwrap()
        };
        assert_eq!(auth(|a| a.registry_token = "t".into()), Some(Credentials::RegistryToken("t".into())));
        assert_eq!(auth(|a| a.identity_token = "i".into()), Some(Credentials::IdentityToken("i".into())));
        assert_eq!(
            auth(|a| {
                a.username = "u".into();
                a.password = "p".into()
            }),
            Some(Credentials::Basic { username: "u".into(), password: "p".into() })
        );
        assert_eq!(
            auth(|a| a.auth = "dTpw".into()),
            Some(Credentials::Basic { username: "u".into(), password: "p".into() })
        );
        assert_eq!(auth(|_| {}), None);
        let bad = cri::AuthConfig { auth: "%%".into(), ..Default::default() };
        assert_eq!(credentials(Some(&bad)).unwrap_err().code(), tonic::Code::InvalidArgument);

        let mut request = Request::new(());
        assert_eq!(grpc_timeout(&request), None);
        for (header, expected) in
            [("1m", Duration::from_millis(1)), ("30S", Duration::from_secs(30)), ("2M", Duration::from_secs(120))]
        {
            request.metadata_mut().insert("grpc-timeout", header.parse().unwrap());
            assert_eq!(grpc_timeout(&request), Some(expected));
        }
        request.metadata_mut().insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&request), None);
    }

    #[test]
    fn errors_map_to_codes() {
        let e = imagestore::ImageReference::parse("Bad").unwrap_err();
        assert_eq!(image_status(e).code(), tonic::Code::InvalidArgument);
        let e = imagestore::Error::Unauthenticated { registry: "r".into(), detail: "d".into() };
        assert_eq!(image_status(e).code(), tonic::Code::Unauthenticated);
        let e = imagestore::Error::HostileLayer { layer: "l".into(), entry: "e".into(), reason: "r".into() };
        assert_eq!(image_status(e).code(), tonic::Code::FailedPrecondition);
    }

    async fn service(dir: &std::path::Path, registry: Option<&str>) -> Images {
        let mut config = imagestore::StoreConfig::default();
        if let Some(host) = registry {
            config
                .registries
                .insert(host.into(), imagestore::RegistryConfig { plain_http: true, ..Default::default() });
        }
        // No records and no containers: opening the runtime touches neither systemd nor the bus.
        // Its state lives apart from the store, whose root the tests inspect.
        let runtime_dir = tempfile::tempdir().unwrap().keep();
        let runtime = runtime::Runtime::open(
            runtime::RuntimeConfig {
                state_root: runtime_dir.join("state"),
                run_root: runtime_dir.join("run"),
                cni: Default::default(),
                userns: Default::default(),
                layer_uid_shift: config.layer_uid_shift,
                tasks_max: 0,
            },
            Arc::new(runtime::Systemd::new("unix:path=/nonexistent")),
        )
        .await
        .unwrap();
        let store = ImageStore::open(dir, config).unwrap();
        Images::new(Arc::new(Node::new(Arc::new(runtime), store, runtime_dir.join("state"))))
    }

    #[tokio::test]
    async fn answers_for_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let images = service(dir.path(), None).await;
        let status = images
            .image_status(Request::new(cri::ImageStatusRequest { image: spec("busybox"), verbose: true }))
            .await
            .unwrap()
            .into_inner();
        assert!(status.image.is_none(), "absent image must be nil, not an error");
        let list = images.list_images(Request::new(cri::ListImagesRequest::default())).await.unwrap().into_inner();
        assert!(list.images.is_empty());
        images.remove_image(Request::new(cri::RemoveImageRequest { image: spec("busybox:1") })).await.unwrap();
        let err = images.remove_image(Request::new(cri::RemoveImageRequest { image: spec("") })).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = images
            .image_status(Request::new(cri::ImageStatusRequest { image: spec("Not Valid"), verbose: false }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let fs = images.image_fs_info(Request::new(cri::ImageFsInfoRequest {})).await.unwrap().into_inner();
        assert_eq!(fs.image_filesystems.len(), 1);
        let usage = &fs.image_filesystems[0];
        assert_eq!(usage.fs_id.as_ref().unwrap().mountpoint, dir.path().display().to_string());
        assert!(usage.inodes_used.unwrap().value >= 3);
        assert!(usage.timestamp > 0);
    }

    #[tokio::test]
    async fn a_pull_past_its_deadline_fails_with_deadline_exceeded_and_leaves_nothing() {
        // A registry that accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let images = service(dir.path(), Some(&host)).await;
        let name = format!("{host}/app:1");
        for timeout in ["1m", "100m"] {
            let mut request = Request::new(cri::PullImageRequest { image: spec(&name), ..Default::default() });
            request.metadata_mut().insert("grpc-timeout", timeout.parse().unwrap());
            let err = images.pull_image(request).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        }
        let list = images.list_images(Request::new(cri::ListImagesRequest::default())).await.unwrap().into_inner();
        assert!(list.images.is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    /// Through a real gRPC server and client. tonic's client enforces the deadline too and reports
    /// its own expiry as Cancelled "Timeout expired"; which answer arrives first is a race under
    /// load, so both are accepted here (the handler's own answer is checked above). What must hold
    /// either way: an error, and nothing left behind.
    #[tokio::test]
    async fn deadline_over_grpc_leaves_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cri.sock");
        let uds = tokio::net::UnixListener::bind(&socket).unwrap();
        let images = service(&dir.path().join("images"), Some(&host)).await;
        let _server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(cri::image_service_server::ImageServiceServer::new(images))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds)),
        );
        let mut client = proto::CriClient::connect(&socket).await.unwrap().image;
        for timeout in [Duration::from_millis(1), Duration::from_millis(300)] {
            let mut request =
                Request::new(cri::PullImageRequest { image: spec(&format!("{host}/app:1")), ..Default::default() });
            request.set_timeout(timeout);
            let err = client.pull_image(request).await.unwrap_err();
            let client_side = err.code() == tonic::Code::Cancelled && err.message() == "Timeout expired";
            assert!(err.code() == tonic::Code::DeadlineExceeded || client_side, "{timeout:?}: {err:?}");
        }
        let list = client.list_images(cri::ListImagesRequest::default()).await.unwrap().into_inner();
        assert!(list.images.is_empty());
        // The pulls' temporary files go once their blocking unpackers notice the cancellation.
        for _ in 0..100 {
            if std::fs::read_dir(dir.path().join("images/tmp")).unwrap().count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(std::fs::read_dir(dir.path().join("images/tmp")).unwrap().count(), 0);
    }
}
