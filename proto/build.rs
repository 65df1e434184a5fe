//! Compiles the vendored CRI `api.proto` (see api/README.md) into the prost messages and the tonic
//! clients and server traits of `runtime.v1`.
//!
//! The .proto is parsed by protox, a protobuf compiler in Rust, not by `protoc`: the upstream file
//! uses the `debug_redact` field option (protobuf 22+), which the `protoc` of Debian 12 (3.21)
//! rejects, and a pure-Rust compiler needs nothing installed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["runtime/v1/api.proto"], ["api"])?;
    tonic_prost_build::configure()
        // Fields upstream marks `debug_redact` (registry credentials): prost ignores the option,
        // so AuthConfig's Debug is written by hand in lib.rs, redacting them.
        .skip_debug([".runtime.v1.AuthConfig"])
        // JSON (the `cri` tool's input and output), as the k8s-cri crate derived it; env values
        // stay strings in JSON although they are bytes on the wire, as upstream's api_json.go does.
        .type_attribute(".runtime.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        .field_attribute(".runtime.v1.KeyValue.value", r#"#[serde(with = "crate::key_value_text")]"#)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=api/runtime/v1/api.proto");
    Ok(())
}
