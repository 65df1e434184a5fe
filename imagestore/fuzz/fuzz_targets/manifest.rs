//! A registry's manifest or index body as a pull reads it (imagestore::read_manifest): JSON
//! parsing, descriptor checks, and the platform choice of an index, for this node's platform and
//! for an arm/v7 node. Arbitrary bytes must give a plan or an error, never a panic.
#![no_main]

use imagestore::{ManifestPlan, Platform, read_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let arm = Platform { os: "linux".into(), architecture: "arm".into(), variant: Some("v7".into()) };
    for platform in [Platform::host(), arm] {
        if let Ok(ManifestPlan::Image(manifest)) = read_manifest(data, &platform, "fuzz") {
            assert!(manifest.config_size <= 4 << 20, "config size cap");
        }
    }
});
