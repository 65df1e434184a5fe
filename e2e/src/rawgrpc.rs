//! A CRI client over a bare HTTP/2 connection, without tonic's `Channel`.
//!
//! tonic's `Channel` enforces a request's `grpc-timeout` itself and reports its own expiry as
//! `Cancelled` ("Timeout expired"), racing the server's answer. kubelet's grpc-go client sends
//! the same header; to assert what the *daemon* answers to a deadline (e.g. `DeadlineExceeded`),
//! the tests send the header over this client, which never times out on its own.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::runtime_service_client::RuntimeServiceClient;
use tonic::body::Body;
use tonic::codegen::http;

/// One HTTP/2 connection to the daemon's socket, usable by the generated CRI clients.
#[derive(Debug, Clone)]
pub struct RawChannel {
    send: SendRequest<Body>,
}

impl RawChannel {
    pub async fn connect(socket: &Path) -> std::io::Result<RawChannel> {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (send, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(RawChannel { send })
    }

    fn origin() -> http::Uri {
        http::Uri::from_static("http://cri.invalid")
    }

    pub fn image(&self) -> ImageServiceClient<RawChannel> {
        ImageServiceClient::with_origin(self.clone(), Self::origin())
    }

    pub fn runtime(&self) -> RuntimeServiceClient<RawChannel> {
        RuntimeServiceClient::with_origin(self.clone(), Self::origin())
    }
}

impl tower::Service<http::Request<Body>> for RawChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.send.send_request(request))
    }
}
