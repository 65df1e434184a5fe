//! CreateContainer and UpdateContainerResources as the daemon reads them: arbitrary bytes
//! decoded as the CRI requests (prost), translated (cri-server/src/container_translate.rs) with
//! a busybox-like image, and checked (runtime::ContainerSpec::validate, argv, environment).
//! Decoding, translation and checks may refuse, never panic.
#![no_main]

use cri_server::container_translate::{container_spec, resources_of};
use imagestore::{Image, ImageConfig, ImageId};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::cri::{CreateContainerRequest, UpdateContainerResourcesRequest};

fn image() -> Image {
    let id: ImageId = "sha256:1111111111111111111111111111111111111111111111111111111111111111".parse().unwrap();
    Image {
        manifest_digest: id.0.clone(),
        id,
        repo_tags: vec!["registry.k8s.io/e2e-test-images/busybox:1.29-2".into()],
        repo_digests: vec![],
        size: 1,
        pinned: false,
        config: ImageConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["sh".into()],
            ..Default::default()
        },
        layers: vec![],
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = UpdateContainerResourcesRequest::decode(data)
        && let Some(linux) = request.linux
    {
        let _ = resources_of(&linux);
    }
    let Ok(request) = CreateContainerRequest::decode(data) else { return };
    let Some(config) = request.config else { return };
    let Ok(spec) = container_spec(config, &image()) else { return };
    if spec.validate().is_ok() {
        let _ = spec.argv();
        let _ = spec.environment();
    }
});
