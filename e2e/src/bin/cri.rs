//! `cri`: a small CRI client for poking at a daemon by hand, printing answers as JSON
//! (crictl is not packaged for Debian; this covers what the demo and debugging need).

use std::path::PathBuf;
use std::process::ExitCode;

use e2e::{CriClient, cri};

const USAGE: &str = "usage: cri [--socket PATH] COMMAND
  version | status | runtime-config | images | image-fs-info | pull IMAGE
  runp POD.json | pods | inspectp POD | stopp POD | rmp POD
  create POD CONTAINER.json | start ID | stop ID [TIMEOUT] | rm ID | ps | inspect ID
  exec [--timeout SECS] ID CMD... (ExecSync: {exit_code, stdout, stderr}) | stats ID | statsp POD | metrics
(POD.json is a PodSandboxConfig, CONTAINER.json a ContainerConfig, as JSON with snake_case keys)";

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
        ["runp", file] => match read_json::<cri::PodSandboxConfig>(file) {
            Ok(config) => client
                .runtime
                .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
                .await
                .map(json),
            Err(e) => return fail(e),
        },
        ["pods"] => client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.map(json),
        ["inspectp", id] => client
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_string(), verbose: true })
            .await
            .map(json),
        ["stopp", id] => client
            .runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.to_string() })
            .await
            .map(json),
        ["rmp", id] => client
            .runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_string() })
            .await
            .map(json),
        ["create", pod, file] => match read_json::<cri::ContainerConfig>(file) {
            Ok(config) => client
                .runtime
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.to_string(),
                    config: Some(config),
                    sandbox_config: None,
                })
                .await
                .map(json),
            Err(e) => return fail(e),
        },
        ["start", id] => {
            client.runtime.start_container(cri::StartContainerRequest { container_id: id.to_string() }).await.map(json)
        }
        ["stop", id, rest @ ..] => {
            let timeout = rest.first().and_then(|t| t.parse().ok()).unwrap_or(10);
            client
                .runtime
                .stop_container(cri::StopContainerRequest { container_id: id.to_string(), timeout })
                .await
                .map(json)
        }
        ["rm", id] => client
            .runtime
            .remove_container(cri::RemoveContainerRequest { container_id: id.to_string() })
            .await
            .map(json),
        ["ps"] => client.runtime.list_containers(cri::ListContainersRequest::default()).await.map(json),
        ["inspect", id] => client
            .runtime
            .container_status(cri::ContainerStatusRequest { container_id: id.to_string(), verbose: true })
            .await
            .map(json),
        ["stats", id] => {
            client.runtime.container_stats(cri::ContainerStatsRequest { container_id: id.to_string() }).await.map(json)
        }
        ["metrics"] => client.runtime.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {}).await.map(json),
        ["statsp", id] => client
            .runtime
            .pod_sandbox_stats(cri::PodSandboxStatsRequest { pod_sandbox_id: id.to_string() })
            .await
            .map(json),
        ["exec", rest @ ..] => {
            let (timeout, rest) = match rest {
                ["--timeout", secs, rest @ ..] => match secs.parse::<i64>() {
                    Ok(secs) => (secs, rest),
                    Err(_) => return fail(format!("bad timeout {secs:?}")),
                },
                _ => (0, rest),
            };
            let [id, cmd @ ..] = rest else {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            };
            if cmd.is_empty() {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
            let request = cri::ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            };
            // stdout and stderr are bytes: printed as (lossy) text rather than number arrays.
            client.runtime.exec_sync(request).await.map(|response| {
                let response = response.into_inner();
                let text = serde_json::json!({
                    "exit_code": response.exit_code,
                    "stdout": String::from_utf8_lossy(&response.stdout),
                    "stderr": String::from_utf8_lossy(&response.stderr),
                });
                serde_json::to_string_pretty(&text).unwrap_or_default()
            })
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

fn read_json<T: serde::de::DeserializeOwned>(file: &str) -> Result<T, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))
}

fn fail(message: String) -> ExitCode {
    eprintln!("cri: {message}");
    ExitCode::FAILURE
}
