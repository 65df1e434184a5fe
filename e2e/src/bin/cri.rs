//! `cri`: a small CRI client for poking at a daemon by hand, printing answers as JSON
//! (crictl is not packaged for Debian; this covers what the demo and debugging need).

use std::path::PathBuf;
use std::process::ExitCode;

use e2e::{CriClient, cri};

const USAGE: &str = "usage: cri [--socket PATH] version|status|runtime-config|images|image-fs-info|pull IMAGE";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket = PathBuf::from("/run/cri-systemd/cri-systemd.sock");
    if args.first().map(String::as_str) == Some("--socket") && args.len() >= 2 {
        socket = PathBuf::from(args.remove(1));
        args.remove(0);
    }
    let mut client = match CriClient::connect(&socket).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("cri: cannot connect to {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    let answer = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["version"] => client.runtime.version(cri::VersionRequest { version: "v1".into() }).await.map(json),
        ["status"] => client.runtime.status(cri::StatusRequest { verbose: true }).await.map(json),
        ["runtime-config"] => client.runtime.runtime_config(cri::RuntimeConfigRequest {}).await.map(json),
        ["images"] => client.image.list_images(cri::ListImagesRequest::default()).await.map(json),
        ["image-fs-info"] => client.image.image_fs_info(cri::ImageFsInfoRequest {}).await.map(json),
        ["pull", image] => {
            let request = cri::PullImageRequest {
                image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
                ..Default::default()
            };
            client.image.pull_image(request).await.map(json)
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match answer {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("cri: {:?}: {}", status.code(), status.message());
            ExitCode::FAILURE
        }
    }
}

fn json<T: serde::Serialize>(response: tonic::Response<T>) -> String {
    serde_json::to_string_pretty(response.get_ref()).unwrap_or_else(|e| format!("unprintable answer: {e}"))
}
