//! Runtime handlers (`[runtimes.<name>]` in the daemon's config), as the kubelet uses them through
//! a RuntimeClass: listed in Status with their features, the handler kept in the pod's record and
//! reported by PodSandboxStatus and ListPodSandbox (across a daemon kill), an unknown handler
//! refused with nothing made, and each handler's settings applied to its pods: `user_namespace`
//! (a user namespace for every pod) and `seccomp_runtime_default` (no container without a filter).

use std::time::Duration;

use e2e::crisimple::{container_config, create, pod, run_pod_sandbox, sh, start};
use e2e::{CriClient, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

const HANDLERS: &str =
    "[runtimes.userns]\nuser_namespace = true\n\n[runtimes.hardened]\nseccomp_runtime_default = true\n";

async fn run_with_handler(
    client: &mut CriClient,
    config: impl Into<cri::PodSandboxConfig>,
    handler: &str,
) -> Result<String, tonic::Status> {
    let request = cri::RunPodSandboxRequest { config: Some(config.into()), runtime_handler: handler.into() };
    client.runtime.run_pod_sandbox(request).await.map(|r| r.into_inner().pod_sandbox_id)
}

async fn pod_status(client: &mut CriClient, id: &str) -> cri::PodSandboxStatus {
    let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: false };
    client.runtime.pod_sandbox_status(request).await.expect("PodSandboxStatus").into_inner().status.unwrap()
}

async fn listed_handlers(client: &mut CriClient) -> Vec<(String, String)> {
    let pods = client.runtime.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await.unwrap().into_inner();
    let mut listed: Vec<(String, String)> = pods.items.into_iter().map(|p| (p.id, p.runtime_handler)).collect();
    listed.sort();
    listed
}

/// The `Seccomp:` mode of a process of the container (0: none, 2: a filter).
async fn seccomp_mode(client: &mut CriClient, id: &str) -> String {
    let (code, out, err) = sh(client, id, "grep '^Seccomp:' /proc/self/status").await;
    assert_eq!(code, 0, "{err}");
    out.split_whitespace().nth(1).unwrap_or_default().to_string()
}

#[tokio::test]
async fn runtime_handlers_are_listed_kept_and_applied() {
    let node = e2e::node_with_local_registry("rt-handlers", HANDLERS);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "handlers").await;
    let sleep = ["/bin/busybox", "sleep", "100000"];

    // Status lists the default handler and both configured ones, by name, each with the
    // features the kubelet reads (user namespaces, recursive read-only mounts).
    let status = client.runtime.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    let handlers: Vec<(String, bool, bool)> = status
        .runtime_handlers
        .iter()
        .map(|h| {
            let features = h.features.unwrap_or_default();
            (h.name.clone(), features.user_namespaces, features.recursive_read_only_mounts)
        })
        .collect();
    assert_eq!(
        handlers,
        [("".to_string(), true, true), ("hardened".to_string(), true, true), ("userns".to_string(), true, true)]
    );

    // An unknown handler is refused, naming it, and nothing is made.
    let error = run_with_handler(&mut client, pod("unknown"), "kata").await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("\"kata\""), "{}", error.message());
    // The userns handler cannot put a pod with the node's network into a user namespace.
    let host_network = pod("hostnet").network(cri::NamespaceMode::Node);
    let error = run_with_handler(&mut client, host_network, "userns").await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("\"userns\"") && error.message().contains("network"), "{}", error.message());
    assert_eq!(listed_handlers(&mut client).await, []);
    assert_eq!(node.sh("ls /var/lib/cri-systemd/pods | wc -l").trim(), "0");

    // The userns handler: a pod that asks for no user namespace gets one (a range of the pool).
    let userns_pod = run_with_handler(&mut client, pod("inuserns"), "userns").await.expect("RunPodSandbox");
    let status = pod_status(&mut client, &userns_pod).await;
    assert_eq!(status.runtime_handler, "userns");
    let userns = status.linux.unwrap().namespaces.unwrap().options.unwrap().userns_options.unwrap();
    assert_eq!(userns.mode, cri::NamespaceMode::Pod as i32, "{userns:?}");
    assert!(userns.uids[0].host_id >= 65536, "{userns:?}");
    let in_userns = create(&mut client, &userns_pod, container_config("c", &image, &sleep)).await.unwrap();
    start(&mut client, &in_userns).await.unwrap();
    let (_, uid_map, _) = sh(&mut client, &in_userns, "cat /proc/self/uid_map").await;
    let host_id = uid_map.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert_eq!(host_id, userns.uids[0].host_id.to_string(), "uid_map: {uid_map}");

    // The hardened handler: a container asking for no filter, or Unconfined, gets RuntimeDefault;
    // the same containers of a default-handler pod run without one.
    let unconfined = || {
        let mut config = container_config("unconfined", &image, &sleep);
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Unconfined as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        config
    };
    let hardened_pod = run_with_handler(&mut client, pod("hardened"), "hardened").await.expect("RunPodSandbox");
    let default_pod = run_pod_sandbox(&mut client, pod("plain")).await.expect("RunPodSandbox");
    for (pod, expected) in [(&hardened_pod, "2"), (&default_pod, "0")] {
        for config in [container_config("none", &image, &sleep), unconfined()] {
            let id = create(&mut client, pod, config).await.unwrap();
            start(&mut client, &id).await.unwrap();
            assert_eq!(seccomp_mode(&mut client, &id).await, expected, "a container of pod {pod}");
        }
    }

    // The handlers are in the pods' records: a killed and restarted daemon reports them.
    let mut expected = vec![
        (userns_pod.clone(), "userns".to_string()),
        (hardened_pod.clone(), "hardened".to_string()),
        (default_pod.clone(), String::new()),
    ];
    expected.sort();
    assert_eq!(listed_handlers(&mut client).await, expected);
    node.sh("systemctl kill -s KILL cri-systemd && systemctl stop cri-systemd; systemctl start cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(listed_handlers(&mut client).await, expected);
    assert_eq!(pod_status(&mut client, &userns_pod).await.runtime_handler, "userns");
    assert_eq!(pod_status(&mut client, &hardened_pod).await.runtime_handler, "hardened");
    // A container created after the restart still gets its handler's settings.
    let mut config = unconfined();
    config.metadata.as_mut().unwrap().attempt = 1;
    let after = create(&mut client, &hardened_pod, config).await.unwrap();
    start(&mut client, &after).await.unwrap();
    assert_eq!(seccomp_mode(&mut client, &after).await, "2");
}
