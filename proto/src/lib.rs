//! The CRI `runtime.v1` API shared by the daemon (`cri-server`) and its clients (the e2e tests and
//! benchmarks): the messages, the `RuntimeService`/`ImageService` server traits and clients, generated
//! at build time from the upstream `api.proto` vendored in `api/` (cri-api version: [`CRI_API_VERSION`]),
//! and [`connect`] to reach a daemon over its unix socket.

use std::path::{Path, PathBuf};

/// The cri-api release whose `api.proto` this crate is built from (see api/README.md).
pub const CRI_API_VERSION: &str = "1.36.3";

/// The generated `runtime.v1` package.
#[allow(missing_debug_implementations, clippy::doc_lazy_continuation, clippy::large_enum_variant)]
pub mod cri {
    tonic::include_proto!("runtime.v1");

    /// Upstream marks `password`, `auth`, `identity_token` and `registry_token` `debug_redact`;
    /// prost ignores that option, so this Debug hides them (a request logged never shows them).
    impl std::fmt::Debug for AuthConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let redacted = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
            f.debug_struct("AuthConfig")
                .field("username", &self.username)
                .field("password", &redacted(&self.password))
                .field("auth", &redacted(&self.auth))
                .field("server_address", &self.server_address)
                .field("identity_token", &redacted(&self.identity_token))
                .field("registry_token", &redacted(&self.registry_token))
                .finish()
        }
    }
}

use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// `KeyValue.value` (bytes since cri-api 1.36.2) in JSON: a string, as before, and as upstream's
/// Go types keep it (api_json.go); bytes that are not UTF-8 become U+FFFD on the way out.
mod key_value_text {
    pub fn serialize<S: serde::Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&String::from_utf8_lossy(value))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        <String as serde::Deserialize>::deserialize(deserializer).map(String::into_bytes)
    }
}

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

#[cfg(test)]
mod tests {
    use super::cri;

    #[test]
    fn auth_config_debug_redacts_secrets() {
        let auth = cri::AuthConfig {
            username: "user".into(),
            password: "hunter2".into(),
            auth: "dXNlcjpodW50ZXIy".into(),
            identity_token: "idtok".into(),
            registry_token: "regtok".into(),
            server_address: "registry.example".into(),
        };
        let shown = format!("{:?}", cri::PullImageRequest { auth: Some(auth), ..Default::default() });
        for secret in ["hunter2", "dXNlcjpodW50ZXIy", "idtok", "regtok"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("user") && shown.contains("registry.example"), "{shown}");
    }

    /// cri-api 1.36.2 made `KeyValue.value` bytes (env values need not be UTF-8); the wire format is
    /// the one of the old `string`, so what an older kubelet sends decodes unchanged.
    #[test]
    fn key_value_is_bytes_and_decodes_old_string_encoding() {
        use prost::Message;
        let mut wire = Vec::new();
        // field 1 (key) "A", field 2 (value) "\xff": as a 1.36.2+ kubelet sends a non-UTF-8 value.
        wire.extend_from_slice(&[0x0a, 1, b'A', 0x12, 1, 0xff]);
        let kv = cri::KeyValue::decode(&wire[..]).expect("non-UTF-8 value decodes");
        assert_eq!(kv.value, vec![0xff]);
    }

    #[test]
    fn key_value_json_value_is_a_string() {
        let text = "{\"key\":\"A\",\"value\":\"gr\u{fc}\u{df}e\"}";
        let kv: cri::KeyValue = serde_json::from_str(text).unwrap();
        assert_eq!(kv.value, "gr\u{fc}\u{df}e".as_bytes());
        assert_eq!(serde_json::to_string(&kv).unwrap(), text);
        let binary = cri::KeyValue { key: "B".into(), value: vec![b'x', 0xff] };
        assert_eq!(serde_json::to_string(&binary).unwrap(), "{\"key\":\"B\",\"value\":\"x\u{fffd}\"}");
    }
}
