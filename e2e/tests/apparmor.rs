//! AppArmor requests are applied or refused, never silently ignored (issue 11). The nodes share
//! the host's kernel: where it has AppArmor, containers must run confined by the runtime's
//! default profile; where it has none (the test machines), asking for a profile must fail at
//! CreateContainer with nothing created. The cgroup v2 VM (Debian's kernel, AppArmor on) checks
//! the confined path in any case (e2e/tests/cgroup_v2.sh).

use std::time::Duration;

use e2e::crisimple::{container_config, create, run_pod, sh, start};
use e2e::{cri, node_with_local_registry, pull_busybox};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

fn apparmor(profile_type: cri::security_profile::ProfileType, localhost_ref: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile { profile_type: profile_type as i32, localhost_ref: localhost_ref.into() })
}

#[tokio::test(flavor = "multi_thread")]
async fn apparmor_requests_are_applied_or_refused_never_ignored() {
    use cri::security_profile::ProfileType;
    let node = node_with_local_registry("apparmor", "");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = pull_busybox(&node, &mut client, "apparmor").await;
    let pod = run_pod(&mut client, "apparmor").await;
    let node_has_apparmor = node.sh("cat /sys/module/apparmor/parameters/enabled 2>/dev/null || true").trim() == "Y";

    let with = |name: &str, profile: Option<cri::SecurityProfile>| {
        let mut config = container_config(name, &image, &["/bin/busybox", "sleep", "1000"]);
        config.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext { apparmor: profile, ..Default::default() }),
            ..Default::default()
        });
        config
    };
    // Unconfined always runs unconfined, and so does a container that asks for nothing on a node
    // without AppArmor.
    for (name, profile) in [("unconfined", apparmor(ProfileType::Unconfined, "")), ("unset", None)] {
        let id = create(&mut client, &pod, with(name, profile)).await.expect("CreateContainer");
        start(&mut client, &id).await.expect("StartContainer");
        let (code, label, _) = sh(&mut client, &id, "cat /proc/self/attr/current").await;
        if node_has_apparmor && name == "unset" {
            assert_eq!(label.trim(), "cri-systemd-default (enforce)", "{name}");
        } else if node_has_apparmor {
            assert_eq!(label.trim(), "unconfined", "{name}");
        } else {
            // Without an LSM that keeps a label, the file cannot be read at all.
            assert_ne!(code, 0, "{name}: {label}");
        }
    }

    let before = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
    let asked = [
        ("default", apparmor(ProfileType::RuntimeDefault, "")),
        ("localhost", apparmor(ProfileType::Localhost, "no-such-profile")),
    ];
    for (name, profile) in asked {
        let result = create(&mut client, &pod, with(name, profile)).await;
        match (node_has_apparmor, name) {
            (true, "default") => {
                let id = result.expect("CreateContainer with RuntimeDefault");
                start(&mut client, &id).await.expect("StartContainer");
                let (_, label, _) = sh(&mut client, &id, "cat /proc/self/attr/current").await;
                assert_eq!(label.trim(), "cri-systemd-default (enforce)");
                // The profile denies writes to the kernel's knobs, even to root with the capability.
                let (code, _, _) = sh(&mut client, &id, "echo 1 > /proc/sysrq-trigger").await;
                assert_ne!(code, 0);
            }
            (true, _) => {
                let e = result.expect_err("a profile that is not loaded");
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("no-such-profile") && e.message().contains("not loaded"), "{e:?}");
            }
            (false, _) => {
                let e = result.expect_err("a profile on a node without AppArmor");
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{name}: {e:?}");
                assert!(e.message().contains("apparmor") && e.message().contains("not enabled"), "{name}: {e:?}");
            }
        }
    }
    if !node_has_apparmor {
        // Refused requests left nothing behind.
        let after = client.runtime.list_containers(cri::ListContainersRequest::default()).await.unwrap().into_inner();
        assert_eq!(before.containers.len(), after.containers.len());
        let dirs = node.sh("ls /var/lib/cri-systemd/containers | wc -l");
        assert_eq!(dirs.trim(), before.containers.len().to_string());
    }
}
