//! Running one CNI plugin (spec section 2, "Execution Protocol"): parameters in the environment,
//! the config on stdin, the result or a JSON error on stdout, a deadline after which the plugin
//! and everything it started are killed.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{CniCommand, CniError};

/// More than any result or error message; a plugin printing more is cut off.
const MAX_STDOUT: usize = 4 << 20;
const MAX_STDERR: usize = 64 << 10;
/// How long, after a plugin exits, processes it left behind may keep its output open.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// One plugin run.
#[derive(Debug)]
pub(crate) struct PluginRun {
    /// The plugin's `type`, for messages.
    pub plugin: String,
    pub path: PathBuf,
    pub command: CniCommand,
    /// CNI_* variables (added to the daemon's own environment, as libcni does, so that plugins
    /// find iptables and friends on PATH).
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
}

/// The error a plugin prints on stdout (spec: "Error").
#[derive(Debug, Deserialize)]
struct PluginError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

impl PluginRun {
    /// Runs the plugin to its end and returns its stdout.
    pub(crate) async fn run(self) -> Result<Vec<u8>, CniError> {
        let plugin = self.plugin.clone();
        tokio::task::spawn_blocking(move || self.run_blocking()).await.map_err(|e| CniError::Spawn {
            plugin,
            source: std::io::Error::other(format!("the plugin task failed: {e}")),
        })?
    }

    /// Runs on a blocking thread that lives until the plugin is reaped: the parent-death signal
    /// below is tied to the thread that forked, not to the process.
    fn run_blocking(self) -> Result<Vec<u8>, CniError> {
        let started = Instant::now();
        let spawn_error = |source| CniError::Spawn { plugin: self.plugin.clone(), source };
        let daemon = std::process::id();
        let mut command = Command::new(&self.path);
        command
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own, so that a timeout kills what the plugin started (IPAM plugins,
            // iptables) along with it.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec; it only makes the
        // async-signal-safe system calls prctl and getppid, and allocates nothing (its errors
        // come from raw OS error codes).
        unsafe {
            command.pre_exec(move || {
                // A plugin that outlived a killed daemon would race the DEL the restarted daemon
                // runs for the same pod.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The daemon may have died before prctl took effect.
                if libc::getppid() as u32 != daemon {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(spawn_error)?;
        let pid = child.id() as i32;

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = self.stdin;
        // A plugin that exits without reading its stdin makes this write fail: not our problem.
        let writer = std::thread::spawn(move || drop(stdin.write_all(&input)));
        let stdout = read_in_background(child.stdout.take().expect("stdout is piped"), MAX_STDOUT);
        let stderr = read_in_background(child.stderr.take().expect("stderr is piped"), MAX_STDERR);

        let (finished, finished_rx) = mpsc::channel::<()>();
        let timeout = self.timeout;
        let watchdog = std::thread::spawn(move || match finished_rx.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_group(pid);
                true
            }
            _ => false,
        });
        let status = child.wait();
        drop(finished);
        let timed_out = watchdog.join().unwrap_or(false);
        let _ = writer.join();
        if timed_out {
            return Err(CniError::Timeout {
                plugin: self.plugin,
                command: self.command,
                seconds: self.timeout.as_secs(),
            });
        }
        let status = status.map_err(spawn_error)?;

        // Processes the plugin left running may hold its output open: they get until the
        // deadline (at least a short grace), then the group is killed.
        let grace = self.timeout.saturating_sub(started.elapsed()).max(OUTPUT_GRACE);
        let output = |reader: mpsc::Receiver<Vec<u8>>| {
            reader.recv_timeout(grace).or_else(|_| {
                kill_group(pid);
                reader.recv_timeout(OUTPUT_GRACE)
            })
        };
        let (Ok(stdout), Ok(stderr)) = (output(stdout), output(stderr)) else {
            return Err(CniError::Failed {
                plugin: self.plugin,
                command: self.command,
                status: describe_status(status),
                output: "it left processes behind that keep its output open".into(),
            });
        };
        if status.success() {
            return Ok(stdout);
        }
        Err(failure(self.plugin, self.command, status, &stdout, &stderr))
    }
}

/// The error for a plugin that exited unsuccessfully: its JSON error if it printed one, else what
/// it wrote.
fn failure(
    plugin: String,
    command: CniCommand,
    status: std::process::ExitStatus,
    stdout: &[u8],
    stderr: &[u8],
) -> CniError {
    if let Ok(error) = serde_json::from_slice::<PluginError>(stdout)
        && (!error.msg.is_empty() || error.code != 0)
    {
        return CniError::Plugin { plugin, command, code: error.code, msg: error.msg, details: error.details };
    }
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
    let output = match (text(stderr), text(stdout)) {
        (err, out) if err.is_empty() => out,
        (err, out) if out.is_empty() => err,
        (err, out) => format!("{err}; stdout: {out}"),
    };
    CniError::Failed { plugin, command, status: describe_status(status), output }
}

fn describe_status(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn kill_group(pgid: i32) {
    // The group may be gone already; nothing to do then.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
}

/// Reads `source` to its end on a thread of its own, keeping the first `limit` bytes (and
/// draining the rest, so that the writer never blocks on a full pipe).
fn read_in_background(mut source: impl Read + Send + 'static, limit: usize) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let room = limit.saturating_sub(kept.len());
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = sender.send(kept);
    });
    receiver
}

/// The CNI_* environment of one plugin run.
pub(crate) fn cni_env(
    command: CniCommand,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
    args: &[(String, String)],
    cni_path: &str,
) -> Vec<(String, String)> {
    let args: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
    vec![
        ("CNI_COMMAND".into(), command.to_string()),
        ("CNI_CONTAINERID".into(), container_id.into()),
        // Empty for a DEL whose namespace is gone (after a reboot): plugins then clean up what
        // lives outside it (IPAM, iptables), as the spec allows.
        ("CNI_NETNS".into(), netns.map(|p| p.display().to_string()).unwrap_or_default()),
        ("CNI_IFNAME".into(), ifname.into()),
        ("CNI_ARGS".into(), args.join(";")),
        ("CNI_PATH".into(), cni_path.into()),
    ]
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn run(path: PathBuf, stdin: &str, timeout: Duration) -> Result<Vec<u8>, CniError> {
        let env = cni_env(
            CniCommand::Add,
            "c1",
            None,
            "eth0",
            &[("K".into(), "V".into()), ("A".into(), "B".into())],
            "/x:/y",
        );
        let run = PluginRun {
            plugin: "test".into(),
            path,
            command: CniCommand::Add,
            env,
            stdin: stdin.as_bytes().to_vec(),
            timeout,
        };
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run.run())
    }

    #[test]
    fn environment_and_stdin_reach_the_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "echo",
            r#"printf '%s|%s|%s|%s|%s|%s|' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH"; cat"#,
        );
        let out = run(path, "{\"in\":1}", Duration::from_secs(10)).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "ADD|c1||eth0|K=V;A=B|/x:/y|{\"in\":1}");
    }

    #[test]
    fn a_json_error_is_the_plugins_own_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            "fail",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":7,"msg":"bad subnet","details":"10.0.0.0/33"}'; exit 1"#,
        );
        let err = run(path, "{}", Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, CniError::Plugin { code: 7, .. }), "{err:?}");
        assert_eq!(err.to_string(), "cni plugin test ADD failed: bad subnet: 10.0.0.0/33 (cni error code 7)");
    }

    #[test]
    fn other_failures_report_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "crash", "echo 'panic: boom' >&2; exit 2");
        let err = run(path, "{}", Duration::from_secs(10)).unwrap_err().to_string();
        assert_eq!(err, "cni plugin test ADD failed (exit status 2): panic: boom");
        let err = run(dir.path().join("missing"), "{}", Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.starts_with("cannot run cni plugin test:"), "{err}");
    }

    #[test]
    fn a_hanging_plugin_and_its_children_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-pid");
        // The plugin starts a child that would keep stdout open for a long time.
        let path = script(dir.path(), "hang", &format!("sleep 600 & echo $! > {}; sleep 600", marker.display()));
        let started = Instant::now();
        let err = run(path, "{}", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CniError::Timeout { seconds: 1, .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert_eq!(err.to_string(), "cni plugin test ADD did not finish within 1 s and was killed");
        let child: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
        // Killed (a zombie at most, until its new parent reaps it); SIGKILL takes a moment.
        let alive = || std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| !s.contains(") Z"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(),
            "the plugin's child {child} still runs: {:?}",
            std::fs::read_to_string(format!("/proc/{child}/stat"))
        );
    }

    #[test]
    fn processes_left_holding_the_output_are_killed_after_a_grace() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "leave", "sleep 600 & echo '{}'");
        let started = Instant::now();
        let out = run(path, "{}", Duration::from_secs(1)).unwrap();
        assert_eq!(out, b"{}\n");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}
