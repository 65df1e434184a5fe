//! The image store of cri-systemd. It owns everything under `<state_root>/images`: blobs kept once
//! by digest and verified, layers unpacked once and shared as overlayfs lower directories, image
//! metadata (references -> manifest -> config -> layers), pulls from registries, garbage collection,
//! and leases on an image's layer directories for the containers the runtime builds on them (the
//! store knows no containers: the daemon tells garbage collection what they use).
//!
//! Layout under the root:
//! - `blobs/<alg>/<hex>`: manifests, indexes, configs and (with `keep_layer_blobs`) compressed layers;
//! - `layers/<alg>/<chain id hex>/diff`: unpacked layers, used as overlayfs lower directories;
//! - `metadata.json`: every image's names, manifest, config and layers, replaced atomically;
//! - `tmp/`: downloads and unpacks in progress, emptied on open.

mod blobs;
mod config;
mod digest;
mod error;
mod layers;
mod meta;
mod platform;
#[cfg(test)]
mod pull_profile;
mod reference;
mod registry;
pub mod signature;
mod store;
#[cfg(test)]
mod store_tests;
// Public for the fuzz targets (imagestore/fuzz): the tar reader and the layer unpacker.
pub mod tarstream;
#[cfg(test)]
mod test_registry;
mod token;
pub mod unpack;
#[cfg(test)]
mod unpack_tests;

pub use config::{FOREIGN_UID_BASE, IdShift, RegistryConfig, StoreConfig};
pub use digest::{Algorithm, Digest};
pub use error::{Error, ErrorKind};
pub use layers::Layer;
pub use meta::ImageConfig;
pub use platform::Platform;
pub use reference::ImageReference;
pub use registry::Credentials;
pub use signature::{ScopePolicy, SignaturePolicy};
pub use store::{
    GcReport, Image, ImageId, ImageManifest, ImageStore, InUse, LayerLease, ManifestPlan, StoreCounters, Usage,
    image_layers, read_manifest,
};
