//! cgroup v2 smoke test. The nspawn nodes of the other tests only have the host's hybrid cgroups
//! (v1 controllers); most production nodes are v2 (unified). This test boots one VM with systemd
//! on the unified hierarchy (`e2e/vm`: QEMU, the host root shared read-only over 9p under a tmpfs
//! overlay), and runs `cgroup_v2.sh` in it: cri-systemd installed and started as
//! deploy/cri-systemd.service, Debian's docker-registry on 127.0.0.1:5000 with the e2e busybox
//! image (built here, pushed there by `push`), and the daemon driven with the `cri` tool. The script reports what it saw in
//! sections; the assertions are here.
//!
//! Needs root, qemu-system-x86, a Debian kernel in /boot and busybox-static (scripts/setup), and
//! the daemon built first (`cargo build -p cri-server`), like the other e2e tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use e2e::cri;
use e2e::crisimple::pod;
use e2e::oci::{Image, busybox_image, many_layers_image};
use serde::de::DeserializeOwned;

const SCRIPT: &str = include_str!("cgroup_v2.sh");
/// The busybox image's OCI layout, in the VM's share.
const LAYOUT: &str = "busybox-layout";
/// The layout of an image of 128 layers (busybox and 127 small ones; the top one's `/top` says
/// 127), for the pod in a user namespace: as many idmapped lowers as the image tests stack.
const DEEP_LAYOUT: &str = "deep-layout";
const DEEP_LAYERS: usize = 128;
const REGISTRY: &str = "127.0.0.1:5000";
const BUSY_MEMORY: i64 = 64 << 20;
const HOG_MEMORY: i64 = 32 << 20;
const BUSY_HUGEPAGES: u64 = 4 << 20;
const BUSY_UNIFIED: [(&str, &str); 3] =
    [("memory.high", "50331648"), ("memory.min", "4194304"), ("memory.oom.group", "1")];
const BUSY_SWAP: i64 = 16 << 20;

/// What the script printed: section name -> text (without the trailing newline).
struct Report {
    sections: BTreeMap<String, String>,
    stdout: String,
    stderr: String,
}

impl Report {
    fn parse(stdout: String, stderr: String) -> Report {
        let mut sections = BTreeMap::new();
        let mut current: Option<(String, Vec<&str>)> = None;
        for line in stdout.lines() {
            if let Some(name) = line.strip_prefix("@@ ") {
                if let Some((name, lines)) = current.take() {
                    sections.insert(name, lines.join("\n"));
                }
                current = Some((name.to_string(), Vec::new()));
            } else if let Some((_, lines)) = current.as_mut() {
                lines.push(line);
            }
        }
        if let Some((name, lines)) = current {
            sections.insert(name, lines.join("\n"));
        }
        Report { sections, stdout, stderr }
    }

    fn dump(&self) -> String {
        format!("--- stdout of the VM script:\n{}\n--- stderr:\n{}", self.stdout, self.stderr)
    }

    fn get(&self, name: &str) -> &str {
        self.sections.get(name).unwrap_or_else(|| panic!("the VM script reported no section {name:?}\n{}", self.dump()))
    }

    fn json<T: DeserializeOwned>(&self, name: &str) -> T {
        serde_json::from_str(self.get(name))
            .unwrap_or_else(|e| panic!("section {name:?} is not the JSON expected: {e}\n{}", self.dump()))
    }
}

fn container_config(name: &str, script: &str, resources: cri::LinuxContainerResources) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: format!("{REGISTRY}/busybox:v2"), ..Default::default() }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        linux: Some(cri::LinuxContainerConfig { resources: Some(resources), ..Default::default() }),
        ..Default::default()
    }
}

/// The daemon binary the nodes use too: ${CARGO_TARGET_DIR:-target}/debug/cri-systemd.
fn daemon_binary(repo: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
    let target = if target.is_absolute() { target } else { repo.join(target) };
    let daemon = target.join("debug/cri-systemd");
    assert!(daemon.is_file(), "no daemon binary at {}: run `cargo build -p cri-server` first", daemon.display());
    daemon
}

/// The VM's script: variables, the JSON configs (complete, as the cri tool reads them), the body.
fn vm_script(repo: &Path) -> String {
    let busy = container_config(
        "busy",
        // Burns some CPU, then holds an 8 MiB string; leaves promptly on SIGTERM (as PID 1 of its
        // PID namespace, the shell would ignore it without a trap).
        "trap 'exit 0' TERM; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
         x=0123456789abcdef; while [ ${#x} -lt 8388608 ]; do x=$x$x; done; \
         while :; do busybox sleep 1; done",
        cri::LinuxContainerResources {
            memory_limit_in_bytes: BUSY_MEMORY,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            // Enforced through the hugetlb controller, which systemd leaves to cri-systemd.
            hugepage_limits: vec![cri::HugepageLimit { page_size: "2MB".into(), limit: BUSY_HUGEPAGES }],
            // Memory QoS as the kubelet sends it on v2, and memory plus swap (runtime::memory_qos).
            unified: BUSY_UNIFIED.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            memory_swap_limit_in_bytes: BUSY_MEMORY + BUSY_SWAP,
            ..Default::default()
        },
    );
    let hog = container_config(
        "hog",
        "x=0123456789abcdef; while :; do x=$x$x; done",
        cri::LinuxContainerResources { memory_limit_in_bytes: HOG_MEMORY, ..Default::default() },
    );
    // Writes to its root file system as the pod's root, then waits for ExecSync to look around.
    let mut uns = container_config(
        "uns",
        "trap 'exit 0' TERM; echo main >/main-wrote; while :; do busybox sleep 1; done",
        cri::LinuxContainerResources::default(),
    );
    uns.image = Some(cri::ImageSpec { image: format!("{REGISTRY}/deep:v2"), ..Default::default() });
    let mut script = String::from("#!/bin/bash\n");
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    // The files the VM needs come through its share: the repository may live under /tmp (CI's
    // clones may), which the VM does not see (its /tmp is its own tmpfs).
    script += &format!("REPO={}\n", quote(repo));
    script +=
        "DAEMON=/cri-vm/share/cri-systemd\nCRI=/cri-vm/share/cri\nPUSH=/cri-vm/share/push\nDEPLOY=/cri-vm/share\n";
    script += &format!("LAYOUT=/cri-vm/share/{LAYOUT}\nDEEP_LAYOUT=/cri-vm/share/{DEEP_LAYOUT}\n");
    script += "WORK=$(mktemp -d)\n";
    let v2_pod = pod("v2").uid("c9200000-0000-4000-8000-000000000002").log_directory("/var/log/pods/e2e_v2");
    // The same pod in a user namespace of its own (KEP-127 `hostUsers: false`): a range of the pool.
    let userns_pod = pod("v2-userns")
        .uid("c9200000-0000-4000-8000-000000000003")
        .hostname("v2")
        .log_directory("/var/log/pods/e2e_v2-userns")
        .pid(cri::NamespaceMode::Container)
        .userns(cri::NamespaceMode::Pod, None);
    for (file, json) in [
        ("pod.json", serde_json::to_string_pretty(&v2_pod.build()).unwrap()),
        ("busy.json", serde_json::to_string_pretty(&busy).unwrap()),
        ("hog.json", serde_json::to_string_pretty(&hog).unwrap()),
        ("userns-pod.json", serde_json::to_string_pretty(&userns_pod.build()).unwrap()),
        ("uns.json", serde_json::to_string_pretty(&uns).unwrap()),
    ] {
        script += &format!("cat >\"$WORK/{file}\" <<'END_OF_JSON'\n{json}\nEND_OF_JSON\n");
    }
    script + SCRIPT
}

/// Writes `image` as an OCI image layout (index.json, blobs/sha256/<hex>) at `dir`: built here,
/// at native speed, and pushed from inside the VM by `push`.
fn write_layout(dir: &Path, image: &Image) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for blob in image.layers.iter().map(|l| &l.blob).chain([&image.config, &image.manifest]) {
        std::fs::write(blobs.join(blob.hex()), &blob.data).unwrap();
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [image.manifest.descriptor()]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn run_in_vm(script: &str) -> Report {
    e2e::require_machine(&["qemu-system-x86_64"]);
    let dir = tempfile_dir();
    let path = dir.join("cgroup_v2.sh");
    std::fs::write(&path, script).unwrap();
    write_layout(&dir.join(LAYOUT), &busybox_image(""));
    write_layout(&dir.join(DEEP_LAYOUT), &many_layers_image(DEEP_LAYERS));
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut command = Command::new(&vm);
    command.arg("run");
    // e2e/vm's default of 180 s is too tight for this script under TCG on a loaded 2-core machine
    // (~245 s measured with three other test runs going, over 420 s beside a workspace build; the
    // AppArmor steps add an apparmor_parser run); CRI_E2E_VM_TIMEOUT still decides if set.
    if std::env::var_os("CRI_E2E_VM_TIMEOUT").is_none() {
        command.args(["--timeout", "900"]);
    }
    let output = command
        .arg(&path)
        .arg(dir.join(LAYOUT))
        .arg(dir.join(DEEP_LAYOUT))
        .arg(daemon_binary(&repo))
        .arg(env!("CARGO_BIN_EXE_cri"))
        .arg(env!("CARGO_BIN_EXE_push"))
        .arg(repo.join("deploy/cri-systemd.service"))
        .arg(repo.join("deploy/config.toml"))
        .stdin(Stdio::null())
        .output()
        .expect("cannot run e2e/vm");
    let _ = std::fs::remove_dir_all(&dir);
    let report = Report::parse(
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success() && report.sections.get("done").map(String::as_str) == Some("ok"),
        "the VM script failed ({}): {}\n{}",
        output.status,
        report.sections.get("error").map_or("no error section", String::as_str),
        report.dump()
    );
    report
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cri-e2e-cgroup-v2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn value(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map_or(0, |v| v.value)
}

#[test]
fn cgroup_v2_smoke() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let begin = Instant::now();
    let r = run_in_vm(&vm_script(&repo));
    let marks: Vec<String> =
        r.sections.iter().filter_map(|(k, v)| Some(format!("{}={v}", k.strip_prefix("time.")?))).collect();
    eprintln!(
        "cgroup v2 VM run (kernel {}) took {:.1} s; {}\nuptime in the VM at each step: {}",
        r.get("kernel"),
        begin.elapsed().as_secs_f64(),
        r.stderr.lines().last().unwrap_or(""),
        marks.join(" ")
    );
    let dump = r.dump();

    // Really v2: a cgroup2 file system at /sys/fs/cgroup with the controllers, no v1 hierarchy.
    assert_eq!(r.get("cgroup.fstype"), "cgroup2fs", "{dump}");
    let controllers: Vec<&str> = r.get("cgroup.controllers").split_whitespace().collect();
    for c in ["cpu", "memory", "pids", "io"] {
        assert!(controllers.contains(&c), "no {c} controller: {controllers:?}");
    }
    assert_eq!(r.get("cgroup.v1_mounts"), "0");

    // The daemon runs as its production unit, and is ready.
    assert_eq!(r.get("daemon.active"), "active");
    assert_eq!(r.get("daemon.cgroup"), "/system.slice/cri-systemd.service");
    let status: cri::StatusResponse = r.json("status");
    let conditions = status.status.unwrap().conditions;
    assert!(conditions.iter().any(|c| c.r#type == "RuntimeReady" && c.status), "{conditions:?}");
    // The preflight says v2 with every controller, idmapped mounts on the state root's ext4,
    // nothing blocking.
    let check = r.get("check");
    eprintln!("cri-systemd check in the VM:\n{check}");
    let line = |name: &str| check.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}: {check}"));
    assert!(line("cgroup version ").contains("ok       v2 (unified)"), "{check}");
    assert!(line("cgroup controllers ").contains("ok"), "{check}");
    assert!(line("hugetlb ").contains("ok"), "{check}");
    assert!(line("state dir ").contains("on ext4"), "{check}");
    assert!(line("idmapped mounts ").contains("ok"), "{check}");
    assert!(check.ends_with("no blocking finding: pods can run on this node\nexit 0"), "{check}");
    let pulled: cri::PullImageResponse = r.json("pull");
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");

    // The container's unit: in the pod's slice, limits as cgroup v2 files.
    let cgroup = r.get("busy.unit.cgroup");
    let busy = r.get("busy.id");
    let slice_cgroup = r.get("pod.slice.cgroup");
    assert!(r.get("busy.unit.slice").ends_with(".slice"));
    assert_eq!(cgroup, format!("{slice_cgroup}/cri-{busy}.service"));
    let unit_controllers: Vec<&str> = r.get("busy.cgroup.controllers").split_whitespace().collect();
    for c in ["cpu", "memory", "pids", "hugetlb"] {
        assert!(unit_controllers.contains(&c), "no {c} in the unit's cgroup.controllers: {unit_controllers:?}");
    }
    assert_eq!(r.get("busy.memory.max"), BUSY_MEMORY.to_string(), "memory.max");
    assert_eq!(r.get("busy.cpu.max"), "50000 100000", "cpu.max from cpu_quota/cpu_period");
    // CPUShares=512 becomes a weight on v2: 512 * 100 / 1024.
    assert_eq!(r.get("busy.cpu.weight"), "50", "cpu.weight from cpu_shares");
    assert_eq!(r.get("busy.pids.max"), "4096", "TasksMax= from containers.tasks_max");
    assert_eq!(r.get("busy.hugetlb.2MB.max"), BUSY_HUGEPAGES.to_string(), "hugetlb.2MB.max\n{dump}");
    assert_eq!(r.get("busy.hugetlb.2MB.rsvd.max"), BUSY_HUGEPAGES.to_string(), "hugetlb.2MB.rsvd.max");
    // unified through MemoryHigh=/MemoryMin=, the swap limit (memory plus swap) as MemorySwapMax=.
    assert_eq!(r.get("busy.memory.high"), "50331648", "memory.high\n{dump}");
    assert_eq!(r.get("busy.memory.min"), "4194304", "memory.min");
    assert_eq!(r.get("busy.memory.low"), "0", "memory.low");
    assert_eq!(r.get("busy.memory.swap.max"), BUSY_SWAP.to_string(), "memory.swap.max");
    assert_eq!(r.get("busy.memory.oom.group"), "1", "memory.oom.group");
    // Metrics through the CRI, from the v2 files: the container's memory and its pressure (PSI).
    let metrics: cri::ListPodSandboxMetricsResponse = r.json("metrics");
    let names: Vec<&str> = metrics
        .pod_metrics
        .iter()
        .flat_map(|p| p.container_metrics.iter().filter(|c| c.container_id == busy).flat_map(|c| c.metrics.iter()))
        .map(|m| m.name.as_str())
        .collect();
    for name in [
        "container_memory_working_set_bytes",
        "container_memory_swap",
        "container_pressure_memory_waiting_seconds_total",
    ] {
        assert!(names.contains(&name), "no {name} for busy: {names:?}");
    }

    // ContainerStats from cpu.stat, memory.current and memory.stat.
    let current: u64 = r.get("busy.memory.current").parse().unwrap();
    assert!(current > 8 << 20, "the container never held 8 MiB: memory.current {current}\n{dump}");
    for name in ["busy.stats1", "busy.stats2"] {
        let stats = r.json::<cri::ContainerStatsResponse>(name).stats.unwrap();
        assert_eq!(stats.attributes.as_ref().unwrap().id, busy);
        let cpu = stats.cpu.as_ref().unwrap();
        let memory = stats.memory.as_ref().unwrap();
        assert!(value(&cpu.usage_core_nano_seconds) > 0, "{name}: no CPU usage: {stats:?}");
        assert!(value(&memory.usage_bytes) > 8 << 20, "{name}: memory usage: {stats:?}");
        assert!(value(&memory.working_set_bytes) > 8 << 20, "{name}: working set: {stats:?}");
        assert!(value(&memory.working_set_bytes) <= value(&memory.usage_bytes), "{name}: {stats:?}");
        assert!(value(&memory.rss_bytes) > 8 << 20, "{name}: rss (anon): {stats:?}");
        assert!(value(&memory.page_faults) > 0, "{name}: page faults: {stats:?}");
        assert!(stats.writable_layer.is_some(), "{name}: {stats:?}");
    }
    let second = r.json::<cri::ContainerStatsResponse>("busy.stats2").stats.unwrap();
    assert!(second.cpu.unwrap().usage_nano_cores.is_some(), "the second sample has a CPU rate");
    let pod_stats = r.json::<cri::PodSandboxStatsResponse>("pod.stats").stats.unwrap().linux.unwrap();
    assert_eq!(pod_stats.containers.len(), 1);
    assert!(value(&pod_stats.memory.unwrap().usage_bytes) > 8 << 20, "the pod's slice counts its container");
    assert!(value(&pod_stats.cpu.unwrap().usage_core_nano_seconds) > 0);

    // ExecSync: output, exit code, and the command ran in the container's own cgroup.
    let exec: serde_json::Value = r.json("busy.exec");
    assert_eq!(exec["exit_code"], 7, "{exec}");
    assert_eq!(exec["stdout"], format!("0::{cgroup}\n"), "{exec}");
    assert_eq!(exec["stderr"], "to-stderr\n", "{exec}");

    // AppArmor: Debian's kernel has it on, so the busy container (which asked for nothing) and a
    // command exec'd in it run confined by the runtime's default profile (the kernel's label of
    // each process; what the profile allows is apparmor_parser's and the kernel's business).
    assert_eq!(r.get("apparmor.enabled"), "Y", "the VM's kernel should have AppArmor enabled\n{dump}");
    assert_eq!(r.get("busy.apparmor"), "cri-systemd-default (enforce)", "{dump}");
    let exec: serde_json::Value = r.json("busy.exec.apparmor");
    assert_eq!(exec["stdout"], "cri-systemd-default (enforce)\n", "{exec}");

    let running = r.json::<cri::ContainerStatusResponse>("busy.inspect").status.unwrap();
    let reported = running.resources.as_ref().unwrap().linux.as_ref().unwrap();
    assert_eq!(reported.unified.get("memory.high").map(String::as_str), Some("50331648"));
    assert_eq!(reported.memory_swap_limit_in_bytes, BUSY_MEMORY + BUSY_SWAP);
    assert_eq!(running.state, cri::ContainerState::ContainerRunning as i32);
    let listed: cri::ListContainersResponse = r.json("ps");
    assert!(listed.containers.iter().any(|c| c.id == busy));

    // Stop and remove: exit status from the TERM trap, then no unit and no cgroup.
    let stopped = r.json::<cri::ContainerStatusResponse>("busy.stopped").status.unwrap();
    assert_eq!(
        (stopped.state, stopped.exit_code, stopped.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 0, "Completed"),
        "{stopped:?}"
    );
    assert_eq!(r.get("busy.cgroup.after_stop"), "gone");
    assert_eq!(r.get("busy.cgroup.after_rm"), "gone");
    assert_eq!(r.get("busy.unit.after_rm"), "not-found");

    // OOM kill, seen by the exit recorder in memory.events.
    let hog = r.json::<cri::ContainerStatusResponse>("hog.inspect").status.unwrap();
    assert_eq!(
        (hog.state, hog.exit_code, hog.reason.as_str()),
        (cri::ContainerState::ContainerExited as i32, 137, "OOMKilled"),
        "{hog:?}\nexit record: {}\nkernel: {}\nafter {} s, unit: {}\n{}",
        r.get("hog.exit_record"),
        r.get("hog.kernel"),
        r.get("hog.exit_seconds"),
        r.sections.get("hog.unit").map_or("", String::as_str),
        r.sections.get("hog.unit_journal").map_or("", String::as_str),
    );
    // systemd's record, unless systemd had not written it yet: then the daemon saw the main
    // process end and the OOM kill in the cgroup itself (runtime::events).
    match r.get("hog.exit_record") {
        missing if missing.contains("No such file") => eprintln!(
            "no exit record after {} s (the daemon's own watch reported the OOM kill); unit: {}\n{}",
            r.get("hog.exit_seconds"),
            r.sections.get("hog.unit").map_or("", String::as_str),
            r.sections.get("hog.unit_journal").map_or("", String::as_str),
        ),
        _ => {
            let record: serde_json::Value = r.json("hog.exit_record");
            assert_eq!(record["oom_killed"], true, "{record}");
            assert_eq!(record["exit_code"], 137, "{record}");
        }
    }
    assert_eq!(r.get("hog.unit.after_rm"), "not-found");

    // The pod in a user namespace, with deploy/config.toml's layer_uid_shift: layers stored in
    // the foreign range, seen as root's by the pod's root, whose writes land in the pod's range;
    // its image has 128 layers, all idmapped lowers of one overlay (the top one wins).
    let deep: cri::PullImageResponse = r.json("deep.pull");
    assert!(deep.image_ref.starts_with("sha256:"), "{deep:?}");
    const FOREIGN: u32 = 0x7FFE_0000;
    assert_eq!(r.get("layer.owner"), format!("{FOREIGN}:{FOREIGN}"), "layers in the foreign range\n{dump}");
    let host: u32 = r.get("uns.host_uid").parse().unwrap_or_else(|_| panic!("no main process of uns\n{dump}"));
    assert!(host >= 0x8_0000 && host.is_multiple_of(65536) && host < FOREIGN, "host uid {host:#x} of the pod's root");
    let map: Vec<&str> = r.get("uns.uid_map").split_whitespace().collect();
    assert_eq!(map, ["0", &host.to_string(), "65536"], "uid_map of the container");
    let exec: serde_json::Value = r.json("uns.exec");
    assert_eq!(
        (&exec["exit_code"], exec["stdout"].as_str().unwrap_or_default()),
        (
            &serde_json::json!(0),
            "0:0 /\n0:0 /bin\n0:0 /bin/busybox\n0:0 /etc/passwd\n0\nmain\n0:0 /etc/exec-wrote\n0:0 /main-wrote\n127\n127\n"
        ),
        "{exec}"
    );
    assert_eq!(r.get("uns.upper"), format!("{host}:{host} main-wrote\n{host}:{host} etc/exec-wrote"));
    // The idmapped layers were attached in a staging tmpfs to make the overlay: none of them
    // stays in the container's mount table, whose / is the overlay.
    let mountinfo = r.get("uns.mountinfo");
    assert!(!mountinfo.contains("/layers/"), "a layer is mounted in the container:\n{mountinfo}");
    let root = mountinfo.lines().find(|l| l.split(' ').nth(4) == Some("/")).unwrap_or_default();
    assert!(root.contains(" - overlay "), "the container's / is not the overlay:\n{mountinfo}");

    // Nothing left of the pods: units, cgroups, records.
    assert!(r.json::<cri::ListPodSandboxResponse>("pods").items.is_empty(), "{dump}");
    assert!(r.json::<cri::ListContainersResponse>("containers").containers.is_empty(), "{dump}");
    for leftover in ["leftover.units", "leftover.cgroups", "leftover.containers", "leftover.pods"] {
        assert_eq!(r.get(leftover), "", "{leftover}\n{dump}");
    }
    let warnings = r.get("daemon.errors");
    if !warnings.is_empty() {
        eprintln!("daemon warnings and errors in the VM:\n{warnings}");
    }
}
