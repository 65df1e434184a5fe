//! How a container ended, recorded by systemd itself: the container unit's `ExecStopPost=` runs
//! `cri-systemd record-exit <file>`, which writes what systemd passes it ($SERVICE_RESULT,
//! $EXIT_CODE, $EXIT_STATUS) and whether the cgroup saw an OOM kill (cgroup v1
//! `memory.oom_control`, v2 `memory.events`). The record is written even
//! while the daemon is down, and outlives the unit, which systemd unloads once it is inactive.
//! Then it runs the container's poststop OCI hooks (from `init.json` beside the record; failures
//! are logged in the unit's journal, not fatal: `init::hooks`).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The hidden subcommand: `cri-systemd record-exit <file>`.
pub const SUBCOMMAND: &str = "record-exit";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// systemd's SERVICE_RESULT: success, exit-code, signal, core-dump, oom-kill, timeout, ...
    pub result: String,
    /// The process exit code, or 128 + the signal number that killed it (as a shell reports it).
    pub exit_code: i32,
    pub oom_killed: bool,
    /// Nanoseconds since the epoch.
    pub finished_at: i64,
    /// Whether systemd passed the main process's exit ($EXIT_CODE); see exit_code().
    #[serde(default = "known")]
    pub main_status_known: bool,
}

fn known() -> bool {
    true
}

/// The body of `cri-systemd record-exit <file>`; returns the process exit code.
pub fn record(path: &Path) -> i32 {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let result = var("SERVICE_RESULT");
    let exit_code = exit_code(&result, &var("EXIT_CODE"), &var("EXIT_STATUS"));
    let main_status_known = !var("EXIT_CODE").is_empty();
    let record = ExitRecord {
        main_status_known,
        oom_killed: result == "oom-kill" || cgroup_saw_oom_kill(),
        result,
        exit_code,
        finished_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
    };
    let written = crate::store::write_json(path, &record);
    run_poststop_hooks(path);
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cri-systemd record-exit: cannot write {}: {e}", path.display());
            1
        }
    }
}

/// The container's poststop hooks (`init.json` next to the exit record), once its processes are
/// gone; failures are logged (the unit's journal), not fatal, as the OCI spec says.
fn run_poststop_hooks(exit_path: &Path) {
    let Some(dir) = exit_path.parent() else { return };
    let init_path = dir.join("init.json");
    if !init_path.exists() {
        return;
    }
    match init::InitSpec::load(&init_path) {
        Ok(spec) => init::hooks::run_stage_logged(&spec, init::hooks::Stage::Poststop, 0),
        Err(e) => eprintln!("cri-systemd record-exit: poststop hooks: {e}"),
    }
}

pub fn read(path: &Path) -> Option<ExitRecord> {
    crate::store::read_json(path).ok()
}

/// `EXIT_CODE=exited EXIT_STATUS=3` -> 3; `EXIT_CODE=killed EXIT_STATUS=KILL` -> 137.
///
/// `SERVICE_RESULT=oom-kill` without `EXIT_CODE` -> 137 (SIGKILL, the OOM killer's signal). On
/// cgroup v2 systemd watches memory.events itself: the OOM kill of a container's main process
/// reaches it first, the cgroup is already empty, and since systemd did not fork that process (init
/// hands it over with MAINPID=, so systemd does not wait for it) ExecStopPost runs before the main
/// process's exit status is collected.
fn exit_code(result: &str, kind: &str, status: &str) -> i32 {
    match kind {
        "exited" => status.parse().unwrap_or(255),
        "killed" | "dumped" => {
            let signal: Option<nix::sys::signal::Signal> = format!("SIG{status}").parse().ok();
            signal.map(|s| 128 + s as i32).or_else(|| status.parse::<i32>().ok().map(|n| 128 + n)).unwrap_or(255)
        }
        "" if result == "oom-kill" => 128 + libc::SIGKILL,
        // No main process exit seen (e.g. the start failed before one existed).
        _ => 255,
    }
}

/// Whether the kernel OOM-killed a task in this process's memory cgroup, which ExecStopPost
/// shares with the container. cgroup v1 reports it in memory.oom_control, v2 in memory.events.
fn cgroup_saw_oom_kill() -> bool {
    let Ok(cgroups) = std::fs::read_to_string("/proc/self/cgroup") else { return false };
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        let counter_file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.oom_control")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.events")
        } else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(counter_file) else { continue };
        let kills = text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse::<u64>().ok());
        if kills.unwrap_or(0) > 0 {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_like_a_shell() {
        assert_eq!(exit_code("success", "exited", "0"), 0);
        assert_eq!(exit_code("exit-code", "exited", "3"), 3);
        assert_eq!(exit_code("signal", "killed", "KILL"), 137);
        assert_eq!(exit_code("signal", "killed", "TERM"), 143);
        assert_eq!(exit_code("core-dump", "dumped", "SEGV"), 139);
        assert_eq!(exit_code("resources", "", ""), 255);
    }

    #[test]
    fn an_oom_kill_without_a_main_process_status_is_sigkill() {
        // cgroup v2: systemd ran ExecStopPost on the OOM event, before reaping the main process.
        assert_eq!(exit_code("oom-kill", "", ""), 137);
        // With the status (cgroup v1, or systemd reaped it first), the status counts.
        assert_eq!(exit_code("oom-kill", "killed", "KILL"), 137);
        assert_eq!(exit_code("oom-kill", "exited", "1"), 1);
    }
}
