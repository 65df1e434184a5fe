//! RunPodSandbox as the daemon reads it: arbitrary bytes decoded as the CRI request (prost),
//! translated (cri-server/src/pod_translate.rs) and checked (runtime::PodSpec::validate), and
//! the pod's slice name derived. Decoding, translation and checks may refuse, never panic.
#![no_main]

use cri_server::pod_translate::pod_spec;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::cri::RunPodSandboxRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = RunPodSandboxRequest::decode(data) else { return };
    let Ok(spec) = pod_spec(request) else { return };
    if spec.validate().is_ok() {
        let slice = spec.slice_name();
        assert!(slice.ends_with(".slice") && !slice.contains('/'), "slice name {slice:?}");
    }
});
