//! OCI hooks (runtime-spec config.md "POSIX-platform Hooks", run as runc runs them): the
//! programs of the spec's `hooks`, today those CDI specs ask for (nvidia-container-toolkit's
//! `nvidia-ctk hook update-ldcache`, `create-symlinks`, ...). Each runs with its `args` (`args[0]`
//! is its argv[0]), exactly its `env`, the container's state JSON on stdin (`ociVersion`, `id`,
//! `status`, `pid` as the node sees it, `bundle`, `annotations`), stdout and stderr captured, and
//! is killed after its `timeout` seconds. Where each stage runs:
//!
//! * `prestart` (deprecated), `createRuntime`, `createContainer`: by init's child once the
//!   container's mounts are made, before pivot_root, so `root.path` of the bundle's config.json
//!   is the container's root file system as the hook sees it (it is mounted only in the
//!   container's mount namespace). The hook is in the container's namespaces but the user
//!   namespace, as root of the node. runc runs createRuntime/prestart from the runtime's mount
//!   namespace; here they share createContainer's moment (the rootfs exists nowhere else). State
//!   status `creating`.
//! * `startContainer`: by the child after pivot_root, before it takes the container's user and
//!   capabilities; its path resolves in the container. Status `created`.
//! * `poststart`: by init once the entrypoint runs, before READY=1 ends StartContainer. Status
//!   `running`. A failure is logged (the unit's journal), not fatal, as the spec says.
//! * `poststop`: by `record-exit` (the unit's ExecStopPost) once the container's processes are
//!   gone, in the node's namespaces. Status `stopped`. Failures are logged.
//!
//! A failing (non-zero exit, killed, timed out, not executable) hook of the first three stages
//! fails the start with the stage, the path, how it ended and the tail of its stderr/stdout.

use std::io::{Read, Seek, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, InitSpec, Result};

/// The OCI stages, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::StartContainer => "startContainer",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    /// The container's status the state JSON gives at this stage (runc's).
    fn status(self) -> &'static str {
        match self {
            Stage::Prestart | Stage::CreateRuntime | Stage::CreateContainer => "creating",
            Stage::StartContainer => "created",
            Stage::Poststart => "running",
            Stage::Poststop => "stopped",
        }
    }

    fn hooks(self, spec: &oci_spec::runtime::Spec) -> &[oci_spec::runtime::Hook] {
        let Some(hooks) = spec.hooks() else { return &[] };
        #[allow(deprecated)]
        let list = match self {
            Stage::Prestart => hooks.prestart(),
            Stage::CreateRuntime => hooks.create_runtime(),
            Stage::CreateContainer => hooks.create_container(),
            Stage::StartContainer => hooks.start_container(),
            Stage::Poststart => hooks.poststart(),
            Stage::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// The most of a failed hook's output kept in the error.
const OUTPUT_TAIL: usize = 512;

/// Runs the hooks of `stage` in order; the first failure ends the stage with its description.
pub fn run_stage(spec: &InitSpec, stage: Stage, pid: u32) -> Result<()> {
    let hooks = stage.hooks(&spec.oci);
    if hooks.is_empty() {
        return Ok(());
    }
    let state = state_json(spec, stage, pid);
    for hook in hooks {
        run_one(hook, &state)
            .map_err(|e| Error::new(format!("{} hook {}: {e}", stage.name(), hook.path().display())))?;
    }
    Ok(())
}

/// Runs the hooks of a stage whose failures are not fatal, reporting each on stderr (the journal).
pub fn run_stage_logged(spec: &InitSpec, stage: Stage, pid: u32) {
    if let Err(e) = run_stage_all(spec, stage, pid) {
        eprintln!("cri-systemd: {e}");
    }
}

/// Like `run_stage` but runs every hook even after a failure (poststart, poststop), returning the failures.
fn run_stage_all(spec: &InitSpec, stage: Stage, pid: u32) -> Result<()> {
    let state = state_json(spec, stage, pid);
    let failures: Vec<String> = stage
        .hooks(&spec.oci)
        .iter()
        .filter_map(|hook| {
            run_one(hook, &state).err().map(|e| format!("{} hook {}: {e}", stage.name(), hook.path().display()))
        })
        .collect();
    if failures.is_empty() { Ok(()) } else { Err(Error::new(failures.join("; "))) }
}

/// The container's bundle directory: where its config.json is (the init spec's directory).
pub fn bundle_of(spec: &InitSpec) -> PathBuf {
    spec.bundle.clone().unwrap_or_else(|| spec.error_file.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The OCI state of the container (runtime.md "State").
pub fn state_json(spec: &InitSpec, stage: Stage, pid: u32) -> Vec<u8> {
    let mut state = serde_json::json!({
        "ociVersion": spec.oci.version(),
        "id": spec.container_id,
        "status": stage.status(),
        "bundle": bundle_of(spec),
        "annotations": spec.oci.annotations().clone().unwrap_or_default(),
    });
    if stage != Stage::Poststop {
        state["pid"] = serde_json::json!(pid);
    }
    serde_json::to_vec(&state).unwrap_or_default()
}

/// Runs one hook to its end; Err describes how it failed.
fn run_one(hook: &oci_spec::runtime::Hook, state: &[u8]) -> std::result::Result<(), String> {
    let memfd = |name: &std::ffi::CStr| -> std::result::Result<std::fs::File, String> {
        rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
            .map(std::fs::File::from)
            .map_err(|e| format!("memfd_create: {e}"))
    };
    let mut stdin = memfd(c"hook-state")?;
    stdin.write_all(state).and_then(|()| stdin.rewind()).map_err(|e| format!("write the state: {e}"))?;
    let mut output = memfd(c"hook-output")?;
    let output_for_stderr = output.try_clone().map_err(|e| format!("dup: {e}"))?;
    let args = hook.args().as_deref().unwrap_or_default();
    let mut command = std::process::Command::new(hook.path());
    if let Some(argv0) = args.first() {
        std::os::unix::process::CommandExt::arg0(&mut command, argv0);
    }
    command.args(args.iter().skip(1)).env_clear();
    for entry in hook.env().as_deref().unwrap_or_default() {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        command.env(key, value);
    }
    command
        .stdin(stdin)
        .stdout(output_for_stderr.try_clone().map_err(|e| format!("dup: {e}"))?)
        .stderr(output_for_stderr);
    let mut child = command.spawn().map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = hook.timeout().map(|t| Instant::now() + Duration::from_secs(t.max(1) as u64));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("wait: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {}s{}", hook.timeout().unwrap_or(0), tail(&mut output)));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    };
    Err(format!("{how}{}", tail(&mut output)))
}

/// The last OUTPUT_TAIL bytes of the hook's output, as ": <text>" (empty without output).
fn tail(output: &mut std::fs::File) -> String {
    let mut text = Vec::new();
    if output.rewind().and_then(|()| output.read_to_end(&mut text)).is_err() {
        return String::new();
    }
    let start = text.len().saturating_sub(OUTPUT_TAIL);
    let text = String::from_utf8_lossy(&text[start..]);
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!(": {}", text.replace('\n', " | ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: serde_json::Value) -> oci_spec::runtime::Hook {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_hook_gets_its_args_only_its_env_and_the_state_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("read -r state; echo \"$0 $1 $HOOK_VAR ${{HOME:-nohome}} $state\" > {}", out.display());
        let h = hook(serde_json::json!({
            "path": "/bin/sh", "args": ["hook-name", "-c", script, "zero", "one"], "env": ["HOOK_VAR=v"]
        }));
        run_one(&h, b"{\"id\":\"c1\"}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "zero one v nohome {\"id\":\"c1\"}\n");
    }

    #[test]
    fn a_failing_hook_says_how_it_ended_with_its_output_tail() {
        let h =
            hook(serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "echo out; echo 'no libs' >&2; exit 3"]}));
        assert_eq!(run_one(&h, b"{}").unwrap_err(), "exit status 3: out | no libs");
        let h = hook(serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "kill -9 $$"]}));
        assert_eq!(run_one(&h, b"{}").unwrap_err(), "killed by signal 9");
        let h = hook(serde_json::json!({"path": "/nonexistent/hook"}));
        assert!(run_one(&h, b"{}").unwrap_err().starts_with("cannot run it: "));
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let h =
            hook(serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "echo started; sleep 30"], "timeout": 1}));
        let started = Instant::now();
        assert_eq!(run_one(&h, b"{}").unwrap_err(), "timed out after 1s: started");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
