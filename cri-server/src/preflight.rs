//! The node preflight: what works on this node and what does not, each with what to do. Printed by
//! `cri-systemd check` (a table, or `--json`; exit status 1 only when a finding blocks pods) and
//! given by Status(verbose) as its `checks` info key (what `crictl info` prints).
//!
//! The checks reuse the daemon's own probes, so that they say what the daemon will find: systemd's
//! manager over the configured bus (`runtime::Systemd`, as Status' RuntimeReady), the CNI config
//! lookup (`CniConfig::readiness`, as NetworkReady), the cgroup mounts and the hugetlb hierarchy
//! (`init::cgroup`, `init::hugetlb`, as init finds them), the idmapped mount of a detached clone
//! (`init::probe_idmapped_mount`, what init does to every layer), NSS (`runtime::userns`, as the
//! pool allocator asks it), AppArmor and SELinux (`runtime::apparmor`, `runtime::selinux`).
//!
//! The first finding (information) names the config file and drop-ins the config was read from.
//!
//! Blocking (exit 1): systemd unreachable, no cgroup hierarchy, no overlayfs, a state root on
//! overlayfs, and, while image layers are stored shifted (`images.layer_uid_shift` non-zero, the
//! default), no idmapped mounts on the state root's filesystem (every container's layers are
//! idmapped overlay lowers). Everything else (CNI not ready: host-network pods still run and the
//! kubelet waits for NetworkReady; controllers, swap accounting, AppArmor, SELinux, CRIU, TPM)
//! is a warning or information: some requests will be refused, pods run.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use runtime::UnitManager;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Works, but something some pods ask for will be refused or degraded.
    Warn,
    /// Does not work.
    Fail,
    /// Neither good nor bad: what the node has.
    Info,
}

/// One finding: a check, its outcome, what was found, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub outcome: Outcome,
    /// Pods cannot run until this is fixed.
    pub blocking: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: &'static str, outcome: Outcome, detail: impl Into<String>) -> Finding {
        Finding { check, outcome, blocking: false, detail: detail.into(), fix: None }
    }
    fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
    fn blocking(mut self, blocking: bool) -> Finding {
        self.blocking = blocking;
        self
    }
}

/// Every finding, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Whether any finding blocks pods.
    pub blocking: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    fn of(findings: Vec<Finding>) -> Report {
        Report { blocking: findings.iter().any(|f| f.blocking), findings }
    }

    /// A table for people: one line a check, its fix on the next.
    pub fn table(&self) -> String {
        let width = self.findings.iter().map(|f| f.check.len()).max().unwrap_or(5).max(5);
        let mut out = format!("{:width$}  {:7}  DETAIL\n", "CHECK", "RESULT");
        for f in &self.findings {
            let result = match (f.outcome, f.blocking) {
                (_, true) => "BLOCKS",
                (Outcome::Ok, _) => "ok",
                (Outcome::Warn, _) => "warn",
                (Outcome::Fail, _) => "fail",
                (Outcome::Info, _) => "info",
            };
            out.push_str(&format!("{:width$}  {result:7}  {}\n", f.check, f.detail));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:width$}  {:7}  fix: {fix}\n", "", ""));
            }
        }
        let blocking = self.findings.iter().filter(|f| f.blocking).count();
        out.push_str(&if blocking == 0 {
            "no blocking finding: pods can run on this node\n".to_string()
        } else {
            format!("{blocking} blocking finding(s): pods cannot run on this node until fixed\n")
        });
        out
    }
}

/// Runs every check against `config` and the systemd behind `systemd`. The file system probes run
/// on a blocking thread.
pub async fn run(config: &Config, systemd: &dyn UnitManager) -> Report {
    let mut findings = vec![config_finding(config), systemd_finding(systemd.manager_info().await)];
    let config = config.clone();
    match tokio::task::spawn_blocking(move || node_findings(&config)).await {
        Ok(more) => findings.extend(more),
        Err(e) => findings.push(Finding::new("checks", Outcome::Fail, format!("the node checks did not finish: {e}"))),
    }
    Report::of(findings)
}

/// The files the config was merged from (the config file, then the drop-ins), as information.
fn config_finding(config: &Config) -> Finding {
    let files: Vec<String> = config.sources.iter().map(|f| f.display().to_string()).collect();
    let detail = if files.is_empty() { "no config file: the defaults".to_string() } else { files.join(", ") };
    Finding::new("config", Outcome::Info, detail)
}

fn systemd_finding(info: Result<runtime::ManagerInfo, runtime::Error>) -> Finding {
    match info {
        Ok(info) => Finding::new(
            "systemd",
            Outcome::Ok,
            format!("systemd {} over the system bus, {}", info.version, info.system_state),
        ),
        Err(e) => Finding::new("systemd", Outcome::Fail, e.to_string())
            .blocking(true)
            .fix("start dbus (systemctl start dbus.socket) or set systemd.bus_address to the system bus"),
    }
}

/// The checks that read the node's files and kernel (blocking calls).
fn node_findings(config: &Config) -> Vec<Finding> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroups = init::cgroup::cgroup_mounts(&mountinfo);
    let shifted = config.images.layer_uid_shift != 0;
    let state_dir = existing_ancestor(&config.state_root);
    let mut findings = cgroup_findings(&cgroups);
    findings.push(task_move_finding(
        &std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
        &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
    ));
    findings.push(overlayfs_finding(&std::fs::read_to_string("/proc/filesystems").unwrap_or_default()));
    findings.push(state_fs_finding(&config.state_root, &state_dir));
    findings.push(userns_finding(shifted));
    findings.push(idmap_finding(&state_dir, config.userns.pool_start, shifted));
    findings.extend(nss_findings(config));
    findings.push(cni_finding(config));
    findings.push(apparmor_finding());
    findings.push(selinux_finding());
    findings.push(criu_finding(&config.checkpoint.criu_path));
    findings.push(tpm_finding());
    findings
}

/// The cgroup layout, the controllers pods use, hugetlb and swap accounting.
fn cgroup_findings(cgroups: &[init::cgroup::CgroupMount]) -> Vec<Finding> {
    let unified_mount =
        cgroups.iter().find(|m| m.controllers.is_empty() && m.mount_point.starts_with("/sys/fs/cgroup"));
    if cgroups.is_empty() {
        return vec![
            Finding::new("cgroups", Outcome::Fail, "no cgroup file system is mounted")
                .blocking(true)
                .fix("boot with systemd as PID 1 (it mounts /sys/fs/cgroup)"),
        ];
    }
    let unified_controllers: Vec<String> = unified_mount
        .map(|m| std::fs::read_to_string(Path::new(&m.mount_point).join("cgroup.controllers")).unwrap_or_default())
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let v1_controllers: Vec<&str> = cgroups
        .iter()
        .flat_map(|m| m.controllers.iter().map(String::as_str))
        .filter(|c| *c != "name=systemd")
        .collect();
    let (layout, outcome) = if runtime::cgroup_unified() {
        ("v2 (unified)", Outcome::Ok)
    } else if unified_mount.is_some() {
        ("hybrid (v1 controllers, v2 for systemd)", Outcome::Warn)
    } else {
        ("v1 (legacy)", Outcome::Warn)
    };
    let mut layout_finding = Finding::new("cgroup version", outcome, layout);
    if outcome == Outcome::Warn {
        layout_finding = layout_finding.fix(
            "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2 (memory QoS, CRI `unified`; v1 is in \
             maintenance in the kubelet)",
        );
    }
    let has = |c: &str| unified_controllers.iter().any(|u| u == c) || v1_controllers.contains(&c);
    let missing: Vec<&str> = ["cpu", "memory", "pids", "cpuset"].into_iter().filter(|c| !has(c)).collect();
    let controllers = if missing.is_empty() {
        Finding::new("cgroup controllers", Outcome::Ok, "cpu, memory, pids, cpuset")
    } else {
        Finding::new("cgroup controllers", Outcome::Warn, format!("missing: {}", missing.join(", ")))
            .fix("enable them in the kernel (CONFIG_CGROUP_*, cgroup_enable=); limits on them are not enforced")
    };
    let hugetlb = match init::hugetlb::Hierarchy::find() {
        Ok(init::hugetlb::Hierarchy::V1(p) | init::hugetlb::Hierarchy::V2(p)) => {
            Finding::new("hugetlb", Outcome::Ok, format!("hugetlb controller at {}", p.display()))
        }
        Err(e) => Finding::new("hugetlb", Outcome::Warn, e.to_string())
            .fix("enable CONFIG_CGROUP_HUGETLB: until then non-zero hugepage limits are refused"),
    };
    vec![layout_finding, controllers, hugetlb, swap_finding(cgroups, unified_mount)]
}

/// Swap accounting: cgroup v2's `memory.swap.max` in a child of the root, or v1's `memsw` files.
fn swap_finding(cgroups: &[init::cgroup::CgroupMount], unified: Option<&init::cgroup::CgroupMount>) -> Finding {
    let v2 = unified.is_some_and(|m| {
        std::fs::read_dir(&m.mount_point)
            .map(|dirs| dirs.flatten().any(|d| d.path().join("memory.swap.max").exists()))
            .unwrap_or(false)
    });
    let v1 = cgroups
        .iter()
        .find(|m| m.controllers.iter().any(|c| c == "memory"))
        .is_some_and(|m| Path::new(&m.mount_point).join("memory.memsw.limit_in_bytes").exists());
    if v2 || v1 {
        Finding::new(
            "swap accounting",
            Outcome::Ok,
            if v2 { "memory.swap.max (cgroup v2)" } else { "memsw (cgroup v1)" },
        )
    } else {
        Finding::new("swap accounting", Outcome::Warn, "no memory.swap.max or memory.memsw files")
            .fix("boot with swapaccount=1 (or a kernel with CONFIG_MEMCG_SWAP): swap limits are not enforced")
    }
}

/// How long a process's move into a cgroup waits. Since Linux 6.0 a write to `cgroup.procs`
/// takes cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period unless a
/// cgroup file system is mounted with `favordynmods` (then forks and exits take a slower path
/// instead). systemd 252 moves every service's first process with such a write, and exec-in
/// joins a container's cgroups with them. Measured in a test node (2 CPUs, Linux 6.18, hybrid
/// cgroups): 4.6 ms per write to the cgroup2 `cgroup.procs` on average, up to 27; with
/// favordynmods CreateContainer+StartContainer p50 went from 42.8 to 22.8 ms.
fn task_move_finding(mounts: &str, kernel_release: &str) -> Finding {
    let mut version = kernel_release.trim().split(['.', '-']).map(|part| part.parse::<u32>().ok());
    let before_6_0 =
        matches!((version.next().flatten(), version.next().flatten()), (Some(major), Some(_)) if major < 6);
    let favoring = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.get(2), Some(&"cgroup" | &"cgroup2"))
            && fields.get(3).is_some_and(|options| options.split(',').any(|o| o == "favordynmods"))
    });
    if favoring {
        Finding::new("cgroup task moves", Outcome::Ok, "favordynmods: moving a process into a cgroup does not wait")
    } else if before_6_0 {
        Finding::new("cgroup task moves", Outcome::Ok, format!("kernel {}: moves do not wait", kernel_release.trim()))
    } else {
        Finding::new(
            "cgroup task moves",
            Outcome::Info,
            "no favordynmods: each container start and ExecSync waits for an RCU grace period (several ms)",
        )
        .fix(
            "boot with cgroup_favordynmods=true (Linux 6.7+), or `mount -o remount,favordynmods /sys/fs/cgroup` \
             (cgroup v2); forks and exits then cost a little more",
        )
    }
}

fn overlayfs_finding(filesystems: &str) -> Finding {
    if filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
        Finding::new("overlayfs", Outcome::Ok, "overlay in /proc/filesystems")
    } else {
        Finding::new("overlayfs", Outcome::Fail, "overlay is not in /proc/filesystems: container roots are overlays")
            .blocking(true)
            .fix("modprobe overlay (and add it to /etc/modules-load.d)")
    }
}

/// The state root's file system (or its nearest existing parent's, before first start).
fn state_fs_finding(state_root: &Path, dir: &Path) -> Finding {
    let fs = nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type());
    let Ok(fs) = fs else {
        return Finding::new("state dir", Outcome::Fail, format!("cannot stat {}", dir.display()))
            .blocking(true)
            .fix("create state_root's parent directory");
    };
    let name = fs_name(fs.0);
    let detail = format!("{} on {name}", state_root.display());
    match name {
        "overlayfs" => {
            Finding::new("state dir", Outcome::Fail, format!("{detail}: overlay upper dirs cannot live there"))
                .blocking(true)
                .fix("put state_root on a disk file system (ext4, xfs, btrfs)")
        }
        "tmpfs" => Finding::new("state dir", Outcome::Warn, format!("{detail}: images and stopped pods go at reboot"))
            .fix("put state_root on a disk file system"),
        _ => Finding::new("state dir", Outcome::Ok, detail),
    }
}

fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0x6573_5546 => "fuse",
        0x6969 => "nfs",
        _ => "another file system",
    }
}

fn userns_finding(shifted: bool) -> Finding {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    match max.trim().parse::<u64>() {
        Ok(n) if n > 0 => Finding::new("user namespaces", Outcome::Ok, format!("max_user_namespaces {n}")),
        _ => Finding::new("user namespaces", Outcome::Fail, format!("max_user_namespaces is {:?}", max.trim()))
            .blocking(shifted)
            .fix("sysctl user.max_user_namespaces=65536 (idmapped layers and hostUsers: false need them)"),
    }
}

fn idmap_finding(dir: &Path, pool_start: u32, shifted: bool) -> Finding {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    match init::probe_idmapped_mount(dir, pool_start) {
        Ok(()) => Finding::new(
            "idmapped mounts",
            Outcome::Ok,
            format!(
                "a mount of {} can be idmapped (kernel {kernel}): layers become idmapped overlay lowers",
                dir.display()
            ),
        ),
        Err(e) => Finding::new("idmapped mounts", Outcome::Fail, format!("{}: {e} (kernel {kernel})", dir.display()))
            .blocking(shifted)
            .fix(
                "run as root; put state_root on ext4, xfs or btrfs (not overlayfs) with Linux >= 5.19; or set \
                 images.layer_uid_shift = 0 (then no pod gets a user namespace)",
            ),
    }
}

/// NSS users in the foreign range (image files would belong to them) and in the pod pool (such
/// ranges are skipped, as systemd skips them).
fn nss_findings(config: &Config) -> Vec<Finding> {
    let shift = config.images.layer_uid_shift;
    let files = [
        std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
        std::fs::read_to_string("/etc/group").unwrap_or_default(),
    ];
    let mut findings = Vec::new();
    if shift != 0 {
        let end = u64::from(shift) + u64::from(runtime::RANGE_SIZE);
        let mut found = names_in_range(&files, u64::from(shift), end);
        if runtime::known_to_nss(shift) && found.is_empty() {
            found.push(format!("NSS knows id {shift}"));
        }
        findings.push(if found.is_empty() {
            Finding::new("foreign UID range", Outcome::Ok, format!("{shift}..{} free of NSS users and groups", end - 1))
        } else {
            Finding::new("foreign UID range", Outcome::Warn, format!("used by {}", found.join(", ")))
                .fix("move those users out of the range: image files would belong to them")
        });
    }
    let start = u64::from(config.userns.pool_start);
    let end = start + u64::from(config.userns.pool_ranges) * u64::from(runtime::RANGE_SIZE);
    let found = names_in_range(&files, start, end);
    findings.push(if found.is_empty() {
        Finding::new("userns pool", Outcome::Ok, format!("{start}..{} free of users and groups in /etc", end - 1))
    } else {
        Finding::new("userns pool", Outcome::Info, format!("ranges skipped for {}", found.join(", ")))
    });
    findings
}

/// `name:id` of the passwd/group entries (`name:x:id:...`) whose id is in `start..end`.
fn names_in_range(files: &[String], start: u64, end: u64) -> Vec<String> {
    files
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u64 = fields.nth(1)?.parse().ok()?;
            (start..end).contains(&id).then(|| format!("{name}:{id}"))
        })
        .collect()
}

fn cni_finding(config: &Config) -> Finding {
    match config.cni.readiness() {
        runtime::NetworkReadiness::Ready { network, config_file } => {
            Finding::new("CNI", Outcome::Ok, format!("network {network:?} from {}", config_file.display()))
        }
        runtime::NetworkReadiness::NotReady { message } => Finding::new("CNI", Outcome::Fail, message).fix(format!(
            "put a network config (.conflist) in {} and its plugins in {} (deploy/ has an example); until then \
             NetworkReady is false and only host-network pods run",
            config.cni.conf_dir.display(),
            config.cni.plugin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ")
        )),
    }
}

fn apparmor_finding() -> Finding {
    match runtime::apparmor::node() {
        runtime::apparmor::NodeAppArmor::Enabled => Finding::new("AppArmor", Outcome::Ok, "enabled"),
        runtime::apparmor::NodeAppArmor::Unavailable(why) => {
            Finding::new("AppArmor", Outcome::Info, format!("{why}: RuntimeDefault and Localhost profiles are refused"))
        }
    }
}

fn selinux_finding() -> Finding {
    if runtime::selinux::node_enabled() {
        Finding::new("SELinux", Outcome::Warn, "enabled: requests with SELinux options are refused (no labels applied)")
            .fix("pods without seLinuxOptions run; cri-systemd applies no SELinux labels")
    } else {
        Finding::new("SELinux", Outcome::Info, "not enabled")
    }
}

/// CRIU for CheckpointContainer: the configured path, or a bare name found on PATH.
fn criu_finding(criu: &Path) -> Finding {
    let found = if criu.components().count() > 1 {
        criu.is_file().then(|| criu.to_path_buf())
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(criu)).find(|p| p.is_file()))
            .unwrap_or_default()
    };
    match found {
        Some(path) => Finding::new("CRIU", Outcome::Ok, format!("{} (checkpoints)", path.display())),
        None => Finding::new("CRIU", Outcome::Warn, format!("{} not found: CheckpointContainer fails", criu.display()))
            .fix("install CRIU >= 4 (scripts/setup-criu) or set checkpoint.criu_path"),
    }
}

fn tpm_finding() -> Finding {
    let tpms: Vec<String> = std::fs::read_dir("/sys/class/tpm")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    if tpms.is_empty() {
        Finding::new("TPM", Outcome::Info, "none")
    } else {
        Finding::new("TPM", Outcome::Info, format!("present: {}", tpms.join(", ")))
    }
}

/// `path`, or its nearest existing ancestor (the state root before the daemon's first start).
fn existing_ancestor(path: &Path) -> PathBuf {
    path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_range_reads_passwd_and_group_ids() {
        let files = [
            "root:x:0:0::/root:/bin/sh\nodd:x:2147352580:1::/:/bin/sh\n# comment\n".to_string(),
            "grp:x:2147418111:\nlast:x:2147418112:\n".to_string(),
        ];
        assert_eq!(names_in_range(&files, 0x7FFE_0000, 0x7FFF_0000), ["odd:2147352580", "grp:2147418111"]);
        assert!(names_in_range(&files, 1, 100).is_empty());
    }

    #[test]
    fn task_moves_wait_on_6_0_and_later_unless_a_cgroup_mount_favors_dynamic_changes() {
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";
        let favoring = "cgroup2 /sys/fs/cgroup cgroup2 rw,relatime,nsdelegate,favordynmods 0 0\n";
        let v1_favoring =
            "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu,favordynmods 0 0\n";
        let waits = task_move_finding(v2, "6.18.44-fc\n");
        assert!(waits.outcome == Outcome::Info && waits.fix.as_deref().is_some_and(|f| f.contains("favordynmods")));
        assert_eq!(task_move_finding(favoring, "6.18.44").outcome, Outcome::Ok);
        assert_eq!(task_move_finding(v1_favoring, "6.8.0-45-generic").outcome, Outcome::Ok);
        assert_eq!(task_move_finding(v2, "5.15.0-91-generic").outcome, Outcome::Ok);
        // An option of another file system does not count.
        let other = "tmpfs /run tmpfs rw,favordynmods 0 0\n".to_string() + v2;
        assert_eq!(task_move_finding(&other, "6.1.0").outcome, Outcome::Info);
    }

    #[test]
    fn overlayfs_is_found_in_proc_filesystems() {
        assert_eq!(overlayfs_finding("nodev\tsysfs\n\text4\nnodev\toverlay\n").outcome, Outcome::Ok);
        let missing = overlayfs_finding("nodev\tsysfs\n\text4\n");
        assert!(missing.blocking && missing.fix.is_some());
    }

    #[test]
    fn only_blocking_findings_block_and_the_table_says_what_to_do() {
        let report = Report::of(vec![
            Finding::new("CNI", Outcome::Fail, "no CNI network config found in /etc/cni/net.d").fix("put one there"),
            Finding::new("TPM", Outcome::Info, "none"),
        ]);
        assert!(!report.blocking);
        let table = report.table();
        assert!(table.contains("CNI") && table.contains("fail") && table.contains("fix: put one there"), "{table}");
        assert!(table.ends_with("no blocking finding: pods can run on this node\n"), "{table}");
        let blocked = Report::of(vec![Finding::new("systemd", Outcome::Fail, "unreachable").blocking(true)]);
        assert!(blocked.blocking && blocked.table().contains("BLOCKS"));
    }
}
