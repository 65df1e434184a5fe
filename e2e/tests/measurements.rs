//! Measured starts (issue 14 part 2) in a node with a software TPM (swtpm over its TCP TCTI):
//! every StartContainer is recorded before it runs (log file, journal with the fixed MESSAGE_ID,
//! PCR 23), `cri-systemd measurements verify` replays the log and compares the PCR, and a log
//! changed in any way fails with the position of the change. A daemon killed between a record and
//! its start (the debug build's failpoint) leaves a log that still verifies, and the next start
//! continues the chain.

use std::time::Duration;

use e2e::crisimple::{self, container_config};
use e2e::{Node, cri};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// cri-server's `measurements::MESSAGE_ID`.
const MESSAGE_ID: &str = "0b424bd67e764aee981de9464b4641af";
const TCTI: &str = e2e::SWTPM_TCTI;
const LOG: &str = "/var/lib/cri-systemd/measurements/starts.log";

/// PCR 23 of the SHA-256 bank as tpm2_pcrread prints it, lowercase hex.
fn pcr23(node: &Node) -> String {
    let out = node.sh(&format!("tpm2_pcrread -T {TCTI} sha256:23"));
    let hex = out.split("0x").nth(1).unwrap_or_else(|| panic!("tpm2_pcrread printed {out}"));
    hex.trim().to_lowercase()
}

/// `cri-systemd measurements verify ARGS` in the node: (exit code, stdout).
fn verify(node: &Node, args: &str) -> (i32, String) {
    let run = node.exec(&["sh", "-c", &format!("/usr/local/bin/cri-systemd measurements verify {args}")]);
    (run.status.code().unwrap_or(-1), format!("{}{}", run.stdout, run.stderr))
}

/// The log's records, parsed.
fn records(node: &Node) -> Vec<serde_json::Value> {
    node.sh(&format!("cat {LOG}")).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// The container ids of the journal entries with the measured-start MESSAGE_ID.
fn journal_container_ids(node: &Node) -> Vec<String> {
    let out = node.sh(&format!("journalctl --no-pager -o json MESSAGE_ID={MESSAGE_ID}"));
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("journal JSON"))
        .map(|entry| entry["CONTAINER_ID"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn create_sleeper(client: &mut e2e::CriClient, pod: &str, image: &str, name: &str) -> String {
    crisimple::create(client, pod, container_config(name, image, &["/bin/busybox", "sleep", "100000"]))
        .await
        .expect("CreateContainer")
}

/// Restarts the daemon with `environment` (a unit drop-in; empty: none).
async fn restart_daemon(node: &Node, environment: &str) -> e2e::CriClient {
    let dropin = "/etc/systemd/system/cri-systemd.service.d/e2e-failpoint.conf";
    if environment.is_empty() {
        node.sh(&format!("rm -f {dropin}"));
    } else {
        node.write_file(dropin, &format!("[Service]\nEnvironment={environment}\n"));
    }
    node.sh("systemctl daemon-reload && systemctl restart cri-systemd");
    node.cri(ANSWER_TIMEOUT).await
}

#[tokio::test]
async fn starts_are_measured_verified_and_survive_a_kill_between_record_and_start() {
    let node = e2e::node_with_local_registry(
        "measure",
        &format!("[measurements]\nenabled = true\ntpm = true\ntcti = \"{TCTI}\"\n"),
    );
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let image = e2e::pull_busybox(&node, &mut client, "measure-registry").await;
    let pod = crisimple::run_pod(&mut client, "measured").await;
    // No TPM yet: the start is refused, naming the TPM, and nothing runs unmeasured.
    let early = create_sleeper(&mut client, &pod, &image, "early").await;
    let refused = crisimple::start(&mut client, &early).await.expect_err("a start without its measurement");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(TCTI), "{refused:?}");
    assert_eq!(crisimple::status(&mut client, &early).await.state(), cri::ContainerState::ContainerCreated);
    assert_eq!(node.sh(&format!("wc -c < {LOG}")).trim(), "0", "no record of a refused start");
    crisimple::remove_container(&mut client, &early).await;
    e2e::start_swtpm(&node);
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let id = create_sleeper(&mut client, &pod, &image, name).await;
        crisimple::start(&mut client, &id).await.expect("StartContainer");
        ids.push(id);
    }

    // Two records, chained, naming what started; the PCR holds the last record's value.
    let log = records(&node);
    assert_eq!(log.len(), 2, "{log:?}");
    for (position, (line, id)) in log.iter().zip(&ids).enumerate() {
        let record = &line["record"];
        assert_eq!(record["seq"], position as u64 + 1);
        assert_eq!(record["event"], "container-start-intended");
        assert_eq!(record["container_id"].as_str(), Some(id.as_str()));
        assert_eq!(record["pod_id"].as_str(), Some(pod.as_str()));
        assert_eq!(record["image"].as_str(), Some(image.as_str()));
        assert!(record["manifest_digest"].as_str().unwrap_or_default().starts_with("sha256:"), "{record}");
        assert!(record["config_digest"].as_str().unwrap_or_default().starts_with("sha256:"), "{record}");
        assert!(!record["layer_chain_ids"].as_array().unwrap().is_empty(), "{record}");
        assert!(record["layer_chain_ids"][0].as_str().unwrap().starts_with("sha256:"), "{record}");
        assert!(record["spec_digest"].as_str().unwrap_or_default().starts_with("sha256:"), "{record}");
        assert_eq!(record["pcr"], 23);
    }
    assert_ne!(log[0]["record"]["spec_digest"], serde_json::Value::Null);
    assert_eq!(pcr23(&node), log[1]["pcr_after"].as_str().unwrap(), "PCR 23 after two starts");
    // The journal lists them by MESSAGE_ID.
    let journal = e2e::eventually(Duration::from_secs(10), "two measured starts in the journal", || {
        let ids = journal_container_ids(&node);
        async move { (ids.len() == 2).then_some(ids) }
    })
    .await;
    assert_eq!(journal, ids);
    let (code, out) = verify(&node, &format!("--tcti {TCTI}"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 2 records, chain intact, PCR 23 equals the replay"), "{out}");

    // Killed after the record, before the start: the log verifies, the container is still
    // Created, and starting it again is a second record of the same container.
    let mut client = restart_daemon(&node, "CRI_SYSTEMD_FAILPOINT=measurement-recorded").await;
    let third = create_sleeper(&mut client, &pod, &image, "third").await;
    let killed = crisimple::start(&mut client, &third).await;
    assert!(killed.is_err(), "the failpoint kills the daemon during StartContainer");
    let mut client = restart_daemon(&node, "").await;
    assert_eq!(crisimple::status(&mut client, &third).await.state(), cri::ContainerState::ContainerCreated);
    let (code, out) = verify(&node, &format!("--tcti {TCTI}"));
    assert_eq!(code, 0, "after the kill: {out}");
    assert!(out.contains("ok: 3 records"), "{out}");
    crisimple::start(&mut client, &third).await.expect("StartContainer after the kill");
    let log = records(&node);
    assert_eq!(log.len(), 4);
    assert_eq!(log[2]["record"]["container_id"], log[3]["record"]["container_id"]);
    let (code, out) = verify(&node, "");
    assert_eq!(code, 0, "the config's TPM: {out}");
    assert!(out.contains("ok: 4 records, chain intact, PCR 23 equals the replay"), "{out}");

    // Killed after the record is written, before its extend: the next daemon finds the PCR at the
    // value before the last record and redoes the extend, so the log verifies against the TPM.
    let mut client = restart_daemon(&node, "CRI_SYSTEMD_FAILPOINT=measurement-written").await;
    let fourth = create_sleeper(&mut client, &pod, &image, "fourth").await;
    assert!(crisimple::start(&mut client, &fourth).await.is_err(), "the failpoint kills the daemon");
    let mut client = restart_daemon(&node, "").await;
    let (code, out) = verify(&node, "");
    assert_eq!(code, 0, "after a kill before the extend: {out}");
    assert!(out.contains("ok: 5 records, chain intact, PCR 23 equals the replay"), "{out}");
    crisimple::start(&mut client, &fourth).await.expect("StartContainer after the kill");
    assert_eq!(pcr23(&node), records(&node)[5]["pcr_after"].as_str().unwrap());

    // Any change is reported at its position, and verify exits 1.
    for (what, edit) in [
        ("edited", r#"sed '2s/"container_name":"second"/"container_name":"evil"/'"#),
        ("deleted", "sed 2d"),
        ("reordered", "awk 'NR == 2 { held = $0; next } NR == 3 { print; print held; next } { print }'"),
        ("torn", "head -c -20"),
    ] {
        node.sh(&format!("{edit} {LOG} > /tmp/{what}.log"));
        let (code, out) = verify(&node, &format!("--no-tpm --log /tmp/{what}.log"));
        assert_eq!(code, 1, "{what}: {out}");
        let position = if what == "torn" { "record 6:" } else { "record 2:" };
        assert!(out.contains(position) && out.contains("FAILED"), "{what}: {out}");
    }

    // A log torn by a crash (a line without its end) is set aside as it is, and the next start
    // begins a new log that continues the chain from the last intact record.
    node.sh(&format!("printf '{{\"record\":{{\"seq\":5,' >> {LOG}"));
    let mut client = restart_daemon(&node, "").await;
    let fifth = create_sleeper(&mut client, &pod, &image, "fifth").await;
    crisimple::start(&mut client, &fifth).await.expect("StartContainer after a torn log");
    let aside = node.sh(&format!("ls {LOG}.torn-*"));
    let aside = aside.trim();
    let (code, out) = verify(&node, &format!("--no-tpm --log {aside}"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("record 7: torn"), "{out}");
    let (code, out) = verify(&node, "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 1 records, chain intact, PCR 23 equals the replay") && out.contains("torn"), "{out}");
    // Every start but the one killed before its extend (and so before its journal entry).
    assert_eq!(journal_container_ids(&node).len(), 6);
}
