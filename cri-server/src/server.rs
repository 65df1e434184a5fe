//! Start-up, the unix socket, and shutdown.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::cri::image_service_server::ImageServiceServer;
use proto::cri::runtime_service_server::RuntimeServiceServer;
use runtime::Systemd;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::authority::AuthorityFix;
use crate::config::Config;
use crate::image_service::Images;
use crate::node::Node;
use crate::runtime_service::RuntimeApi;

/// Why the daemon could not start; each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create {what} {path}: {source}; create it or set `{key}` in the config")]
    CreateDir { what: &'static str, key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path} is not writable: {source}; make it writable or set `{key}` in the config")]
    NotWritable { what: &'static str, key: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "socket {0} is in use by a running process (another cri-systemd?); stop it or set `socket` to another path"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or set `socket` to another path")]
    NotASocket(PathBuf),
    #[error("cannot listen on socket {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot open the image store: {0}")]
    Images(imagestore::Error),
    #[error("cannot seal the daemon's binary for containers (run_root must allow mounts): {0}")]
    SealBinary(runtime::Error),
    #[error("cannot recover pods: {0}")]
    Recover(#[from] runtime::Error),
    #[error("cannot start the streaming server: {0}")]
    Streaming(#[from] crate::streaming::StreamingError),
    #[error("cannot start the metrics endpoint: {0}")]
    Metrics(#[from] crate::prometheus::MetricsError),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("measured starts (`[measurements]`): {0}")]
    Measurements(String),
}

/// Runs the daemon until SIGTERM or SIGINT. Containers are never stopped on the way out: they
/// are systemd's units and keep running while the daemon is away.
/// `traced`: give every CRI call an OpenTelemetry span (`otel.rs`; the exporter is set up by then).
pub async fn serve(config: Config, traced: bool) -> Result<(), StartupError> {
    info!(version = env!("CARGO_PKG_VERSION"), "cri-systemd starting");
    prepare_dir(&config.state_root, "state root", "state_root", 0o711)?;
    prepare_dir(&config.run_root, "run root", "run_root", 0o711)?;
    runtime::tighten_modes(&config.state_root, &config.run_root);
    // Every unit and exec-in runs the daemon's binary from this read-only mount (CVE-2019-5736).
    let sealed = runtime::sealed_exe::seal(&config.run_root).map_err(StartupError::SealBinary)?;
    info!(path = %sealed.display(), "the daemon's binary is sealed read-only for units and exec-in");
    seal_init_helper(&config.run_root);

    let systemd = Arc::new(Systemd::new(config.systemd.bus_address.clone()));
    // The daemon serves even without systemd (Status then says why it is not ready), so that
    // the kubelet can see the reason instead of a dead socket.
    match systemd.manager_info().await {
        Ok(manager) => info!(
            version = %manager.version,
            features = %manager.features,
            virtualization = %manager.virtualization,
            state = %manager.system_state,
            "connected to systemd"
        ),
        Err(e) => warn!("{e}; RuntimeReady stays false until systemd answers"),
    }

    let runtime_config = runtime::RuntimeConfig {
        state_root: config.state_root.clone(),
        run_root: config.run_root.clone(),
        cni: config.cni.clone(),
        userns: config.userns.clone(),
        layer_uid_shift: config.images.layer_uid_shift,
        tasks_max: config.containers.tasks_max,
    };
    let runtime = Arc::new(runtime::Runtime::open(runtime_config, systemd).await?);
    if config.measurements.enabled {
        let measurer = crate::measurements::Measurer::open(&config.measurements, &config.state_root)
            .map_err(|e| StartupError::Measurements(e.to_string()))?;
        runtime.set_start_gate(Arc::new(measurer)).map_err(|e| StartupError::Measurements(e.to_string()))?;
    }
    runtime.spawn_exit_watcher();
    // The journal cursor of versions that read container output from the journal.
    let _ = std::fs::remove_file(config.state_root.join("logs.cursor"));
    let images = imagestore::ImageStore::open(&config.state_root.join("images"), config.images.clone())
        .map_err(StartupError::Images)?;
    let streaming = crate::streaming::StreamingServer::start(&config.streaming, runtime.clone()).await?;
    let node = Arc::new(Node::new(runtime, images, config.state_root.clone()));
    // Before the CRI socket: a metrics address that cannot be bound stops the start, leaving nothing.
    let grpc_metrics = crate::prometheus::start(&config.metrics, node.clone()).await?;
    let listener = listen(&config.socket)?;
    let config = Arc::new(config);
    let mut terminate = signal(SignalKind::terminate()).map_err(StartupError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(StartupError::Signals)?;
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();

    info!(socket = %config.socket.display(), "serving CRI");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving CRI on {}", config.socket.display())),
    ]);
    let socket = config.socket.clone();
    let server = tonic::transport::Server::builder()
        .layer(grpc_metrics)
        .layer(crate::otel::CallSpans::new(traced))
        .add_service(RuntimeServiceServer::new(RuntimeApi::new(config.clone(), node.clone(), streaming)))
        .add_service(ImageServiceServer::new(Images::new(node)))
        .serve_with_incoming_shutdown(incoming(listener), async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        _ = terminate.recv() => stop(&mut server, stop_serving, "SIGTERM").await,
        _ = interrupt.recv() => stop(&mut server, stop_serving, "SIGINT").await,
    };
    // Only our own socket file: leaving it would make the next start probe a dead socket.
    if let Err(e) = std::fs::remove_file(&socket) {
        warn!("cannot remove socket {}: {e}", socket.display());
    }
    result?;
    info!("stopped");
    Ok(())
}

/// How long requests under way may take to finish after SIGTERM. Clients such as the kubelet keep
/// their connections open for good, so the server cannot wait for them to close.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops accepting, lets requests under way finish for a while, then gives up on them.
async fn stop<F>(
    server: &mut std::pin::Pin<&mut F>,
    stop_serving: tokio::sync::oneshot::Sender<()>,
    signal: &str,
) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    info!("{signal}: stopping (containers keep running)");
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_serving.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server.as_mut()).await {
        Ok(result) => result,
        Err(_) => {
            info!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
    }
}

fn notify(state: &[sd_notify::NotifyState]) {
    // Outside systemd there is no NOTIFY_SOCKET and this does nothing.
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("cannot notify systemd: {e}");
    }
}

/// Creates `path` if missing and checks that it is writable.
fn prepare_dir(path: &Path, what: &'static str, key: &'static str, mode: u32) -> Result<(), StartupError> {
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path).map_err(|source| StartupError::CreateDir {
        what,
        key,
        path: path.into(),
        source,
    })?;
    // A read-only mount or a foreign owner shows only on write: try one.
    let probe = path.join(format!(".write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| StartupError::NotWritable { what, key, path: path.into(), source })
}

/// Binds the CRI socket with mode 0660, replacing a stale socket left by a dead daemon.
/// The socket's connections, each behind [`AuthorityFix`] (clients that send the socket's path as
/// `:authority`, which h2 alone would refuse).
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|connection| connection.map(AuthorityFix::new))
}

fn listen(path: &Path) -> Result<UnixListener, StartupError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(StartupError::NotASocket(path.into())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(StartupError::SocketInUse(path.into())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                info!(socket = %path.display(), "replacing stale socket of a dead daemon");
                std::fs::remove_file(path).map_err(|source| StartupError::Listen { path: path.into(), source })?;
            }
            Err(source) => return Err(StartupError::Listen { path: path.into(), source }),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => return Err(StartupError::Listen { path: path.into(), source }),
    }
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)
            .map_err(|source| StartupError::Listen { path: path.into(), source })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| StartupError::Listen { path: path.into(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| StartupError::Listen { path: path.into(), source })?;
    Ok(listener)
}

/// Seals `cri-systemd-init` (beside the daemon's binary) for init and exec-in when its build id is
/// the daemon's (`init::helper`). Without it, or with another build's, the daemon's binary does
/// both, as it always could: the helper only makes each exec cheaper.
fn seal_init_helper(run_root: &std::path::Path) {
    let Some(helper) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(init::helper::BINARY)))
        .filter(|helper| helper.is_file())
    else {
        info!("no {} beside the daemon's binary: init and exec-in run the daemon's binary", init::helper::BINARY);
        runtime::sealed_exe::forget_helper(run_root);
        return;
    };
    let accept = |sealed: &std::path::Path| match std::process::Command::new(sealed)
        .arg(init::helper::BUILD_ID_FLAG)
        .output()
    {
        Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == init::helper::BUILD_ID => {
            true
        }
        Ok(out) => {
            warn!(
                helper = %helper.display(),
                build_id = %String::from_utf8_lossy(&out.stdout).trim(),
                want = init::helper::BUILD_ID,
                "the init helper is from another build: init and exec-in run the daemon's binary"
            );
            false
        }
        Err(e) => {
            warn!(helper = %helper.display(), "cannot run the init helper ({e}): init and exec-in run the daemon's binary");
            false
        }
    };
    match runtime::sealed_exe::seal_helper(run_root, &helper, accept) {
        Ok(true) => info!(helper = %helper.display(), "init and exec-in run the sealed init helper"),
        Ok(false) => {}
        Err(e) => {
            warn!(helper = %helper.display(), "cannot seal the init helper ({e}): init and exec-in run the daemon's binary")
        }
    }
}
