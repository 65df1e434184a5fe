//! An image config as a pull reads it (imagestore::image_layers): JSON parsing, the settings a
//! container inherits, rootfs.diff_ids and the chain ids, for manifests of 0 to 3 layers.
#![no_main]

use imagestore::{Digest, image_layers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layer: Digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000".parse().unwrap();
    let mut layers = Vec::new();
    for _ in 0..4 {
        if let Ok((_, parsed)) = image_layers(&layers, data) {
            assert_eq!(parsed.len(), layers.len());
        }
        layers.push((layer.clone(), 1, "application/vnd.oci.image.layer.v1.tar+gzip".to_string()));
    }
});
