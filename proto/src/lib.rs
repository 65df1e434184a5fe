//! The CRI `runtime.v1` API shared by the daemon (`cri-server`) and its clients (the e2e tests and
//! benchmarks): the generated messages, the `RuntimeService`/`ImageService` server traits and clients
//! (from the `k8s-cri` crate), and [`connect`] to reach a daemon over its unix socket.

use std::path::{Path, PathBuf};

pub use k8s_cri::v1 as cri;

use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a gRPC channel to a CRI endpoint listening on the unix socket at `socket`.
///
/// The channel carries both services, as kubelet and crictl use one endpoint for both.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.as_ref().to_path_buf();
    // The URI is required by tonic but unused: the connector below ignores it.
    Endpoint::from_static("http://cri.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Both CRI clients over one channel.
#[derive(Debug, Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
}

impl CriClient {
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, tonic::transport::Error> {
        let channel = connect(socket).await?;
        Ok(Self { runtime: RuntimeServiceClient::new(channel.clone()), image: ImageServiceClient::new(channel) })
    }
}
