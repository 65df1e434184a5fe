//! AppArmor for containers: what the kubelet asks for (`apparmor` in the container's security
//! context) is applied or refused, never silently ignored.
//!
//! As containerd does: on a node with AppArmor enabled, a container that asks for nothing, or
//! for `RuntimeDefault`, runs under the runtime's default profile ([`DEFAULT_PROFILE`], generated
//! here and loaded with `apparmor_parser` the first time it is needed), unless it is privileged;
//! `Localhost` names a profile already loaded on the node; `Unconfined` runs unconfined. On a
//! node without AppArmor, asking for anything but `Unconfined` is an error.
//!
//! The profile is applied by `cri-systemd init` (and `exec-in`) as an exec transition right before
//! the entrypoint's execve (`/proc/self/attr/apparmor/exec`, as runc does), not with systemd's
//! `AppArmorProfile=`: that would confine init itself, and the default profile denies the mounts
//! init makes.
//!
//! # When and how
//!
//! Resolved at CreateContainer (so a profile the node cannot apply fails there): the default
//! profile `cri-systemd-default` for containers that ask for nothing or `RuntimeDefault` on an
//! AppArmor node (loaded once per daemon with `apparmor_parser -K -r` from the text the daemon
//! generates, so it never depends on the node's /etc/apparmor.d), a loaded `Localhost` profile, or
//! none; refused where the kernel has no AppArmor. The profile goes into `init.json` as
//! `process.apparmorProfile`, and init (and exec-in) write `exec <profile>` to
//! `/proc/self/attr/apparmor/exec` just before the execve, as runc does: systemd's
//! `AppArmorProfile=` would confine init itself, and the profile denies the mounts init makes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The name of the runtime's default profile (containerd's is `cri-containerd.apparmor.d`).
pub const DEFAULT_PROFILE: &str = "cri-systemd-default";

/// What a container asked for. Records written before this field existed read as `Unset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppArmor {
    /// No choice made: the default profile where AppArmor is enabled, nothing elsewhere.
    #[default]
    Unset,
    Unconfined,
    RuntimeDefault,
    /// A profile loaded on the node, by name.
    Localhost(String),
}

/// The AppArmor state of a node, as the kernel shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAppArmor {
    Enabled,
    /// Why profiles cannot be applied here.
    Unavailable(&'static str),
}

/// Where the kernel lists the loaded profiles (securityfs).
const PROFILES: &str = "/sys/kernel/security/apparmor/profiles";

/// Whether this node can confine processes with AppArmor: the LSM is enabled and its securityfs
/// interface is mounted (what runc and containerd check, `apparmor.IsEnabled`).
pub fn node() -> NodeAppArmor {
    match std::fs::read_to_string("/sys/module/apparmor/parameters/enabled") {
        Ok(s) if s.trim() == "Y" => {}
        _ => return NodeAppArmor::Unavailable("AppArmor is not enabled in this node's kernel"),
    }
    if !Path::new(PROFILES).exists() {
        return NodeAppArmor::Unavailable("AppArmor's securityfs (/sys/kernel/security/apparmor) is not mounted");
    }
    NodeAppArmor::Enabled
}

/// The profile a container's process is to run under (None: unconfined), loading the default
/// profile first if needed. Called at CreateContainer, so that a request this node cannot honour
/// fails there, with nothing created.
pub(crate) fn resolve(requested: &AppArmor, privileged: bool) -> Result<Option<String>, Error> {
    resolve_on(node(), requested, privileged, loaded, ensure_default_loaded)
}

fn resolve_on(
    node: NodeAppArmor,
    requested: &AppArmor,
    privileged: bool,
    loaded: impl Fn(&str) -> std::io::Result<bool>,
    load_default: impl Fn() -> Result<(), Error>,
) -> Result<Option<String>, Error> {
    if let NodeAppArmor::Unavailable(why) = node {
        return match requested {
            AppArmor::Unset | AppArmor::Unconfined => Ok(None),
            AppArmor::RuntimeDefault => Err(Error::NodeUnsupported(format!(
                "apparmor profile RuntimeDefault cannot be applied: {why} (ask for Unconfined, or none)"
            ))),
            AppArmor::Localhost(name) => Err(Error::NodeUnsupported(format!(
                "apparmor profile {name:?} cannot be applied: {why} (ask for Unconfined, or none)"
            ))),
        };
    }
    match requested {
        AppArmor::Unconfined => Ok(None),
        // As containerd (kubernetes#51746): privileged containers get no default profile.
        AppArmor::Unset | AppArmor::RuntimeDefault if privileged => Ok(None),
        AppArmor::Unset | AppArmor::RuntimeDefault => {
            load_default()?;
            Ok(Some(DEFAULT_PROFILE.to_string()))
        }
        AppArmor::Localhost(name) => {
            check_name(name)?;
            match loaded(name) {
                Ok(true) => Ok(Some(name.clone())),
                Ok(false) => Err(Error::NodeUnsupported(format!(
                    "apparmor profile {name:?} is not loaded on this node (load it with apparmor_parser first)"
                ))),
                Err(e) => Err(Error::Io { what: format!("cannot read {PROFILES}"), source: e }),
            }
        }
    }
}

/// A profile name goes into `/proc/self/attr/apparmor/exec` as `exec <name>`: one line, no NUL.
fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.contains(['\n', '\0']) {
        return Err(Error::InvalidSpec(format!("apparmor profile name {name:?} is not a valid profile name")));
    }
    Ok(())
}

/// Whether a profile of that name is loaded: `/sys/kernel/security/apparmor/profiles` has a line
/// `<name> (<mode>)` for each.
fn loaded(name: &str) -> std::io::Result<bool> {
    let list = std::fs::read_to_string(PROFILES)?;
    Ok(list.lines().any(|line| line.rsplit_once(" (").is_some_and(|(n, _)| n == name)))
}

/// Loads the default profile once per daemon (and again after a restart: `-r` replaces it, so
/// a newer daemon's profile wins).
fn ensure_default_loaded() -> Result<(), Error> {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut done = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let failed = |why: String| {
        Error::NodeUnsupported(format!("cannot load the default apparmor profile {DEFAULT_PROFILE}: {why}"))
    };
    // -K: no cache files written on the node; -r: replace (or add).
    let mut child = Command::new("apparmor_parser")
        .args(["-K", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("apparmor_parser: {e} (install the apparmor package)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(default_profile().as_bytes()).map_err(|e| failed(format!("apparmor_parser's stdin: {e}")))?;
    }
    let output = child.wait_with_output().map_err(|e| failed(format!("apparmor_parser: {e}")))?;
    if !output.status.success() {
        return Err(failed(format!(
            "apparmor_parser {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    *done = true;
    Ok(())
}

/// The default profile: everything a container normally does (files, network, capabilities it
/// was given, signals among its own processes), minus what reaches past the container: mounts,
/// writes to the kernel's knobs in /proc and /sys, and the node's memory and security files.
/// The same rules as Docker's and containerd's default profiles; no abstraction is included, so
/// the text does not depend on the node's /etc/apparmor.d.
pub fn default_profile() -> String {
    format!(
        r#"@{{PROC}}=/proc/

profile {DEFAULT_PROFILE} flags=(attach_disconnected,mediate_deleted) {{
  network,
  capability,
  file,
  umount,
  pivot_root,
  # Signals from the node's unconfined processes (systemd's stop, the daemon's kill) and among
  # the container's own.
  signal (receive) peer=unconfined,
  signal (send,receive) peer={DEFAULT_PROFILE},
  ptrace (trace,read,tracedby,readby) peer={DEFAULT_PROFILE},

  deny mount,

  # /proc: no writes to the kernel's files, only to the processes' own (/proc/<pid>/...) and
  # to /proc/sys/kernel/shm*.
  deny @{{PROC}}/* w,
  deny @{{PROC}}/{{[^1-9/],[^1-9/][^0-9/],[^1-9s/][^0-9y/][^0-9s/],[^1-9/][^0-9/][^0-9/][^0-9/]*}}/** w,
  deny @{{PROC}}/sys/[^k]** w,
  deny @{{PROC}}/sys/kernel/{{?,??,[^s][^h][^m]**}} w,
  deny @{{PROC}}/sysrq-trigger rwklx,
  deny @{{PROC}}/kcore rwklx,
  deny @{{PROC}}/mem rwklx,
  deny @{{PROC}}/kmem rwklx,

  # /sys: nothing writable but the cgroup files.
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/devices/virtual/powercap/** rwklx,
  deny /sys/kernel/security/** rwklx,
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never_loaded(_: &str) -> std::io::Result<bool> {
        Ok(false)
    }
    fn no_load() -> Result<(), Error> {
        Ok(())
    }

    #[test]
    fn without_apparmor_only_unset_and_unconfined_run() {
        let node = NodeAppArmor::Unavailable("not here");
        assert_eq!(resolve_on(node, &AppArmor::Unset, false, never_loaded, no_load).unwrap(), None);
        assert_eq!(resolve_on(node, &AppArmor::Unconfined, false, never_loaded, no_load).unwrap(), None);
        let e = resolve_on(node, &AppArmor::RuntimeDefault, false, never_loaded, no_load).unwrap_err();
        assert!(matches!(&e, Error::NodeUnsupported(m) if m.contains("not here")), "{e}");
        let e = resolve_on(node, &AppArmor::Localhost("p".into()), true, never_loaded, no_load).unwrap_err();
        assert!(matches!(&e, Error::NodeUnsupported(m) if m.contains("\"p\"")), "{e}");
    }

    #[test]
    fn with_apparmor_the_default_profile_confines_unprivileged_containers() {
        let node = NodeAppArmor::Enabled;
        let default = Some(DEFAULT_PROFILE.to_string());
        assert_eq!(resolve_on(node, &AppArmor::Unset, false, never_loaded, no_load).unwrap(), default);
        assert_eq!(resolve_on(node, &AppArmor::RuntimeDefault, false, never_loaded, no_load).unwrap(), default);
        assert_eq!(resolve_on(node, &AppArmor::Unset, true, never_loaded, no_load).unwrap(), None);
        assert_eq!(resolve_on(node, &AppArmor::Unconfined, false, never_loaded, no_load).unwrap(), None);
        let failing_load = || Err(Error::NodeUnsupported("no parser".into()));
        assert!(resolve_on(node, &AppArmor::Unset, false, never_loaded, failing_load).is_err());
    }

    #[test]
    fn localhost_profiles_must_be_loaded() {
        let node = NodeAppArmor::Enabled;
        let only_mine = |n: &str| Ok(n == "mine");
        let got = resolve_on(node, &AppArmor::Localhost("mine".into()), false, only_mine, no_load).unwrap();
        assert_eq!(got.as_deref(), Some("mine"));
        let e = resolve_on(node, &AppArmor::Localhost("other".into()), false, only_mine, no_load).unwrap_err();
        assert!(matches!(&e, Error::NodeUnsupported(m) if m.contains("not loaded")), "{e}");
        let e = resolve_on(node, &AppArmor::Localhost("a\nb".into()), false, only_mine, no_load).unwrap_err();
        assert!(matches!(e, Error::InvalidSpec(_)));
    }

    #[test]
    fn the_default_profile_names_itself_and_denies_mounts() {
        let text = default_profile();
        assert!(text.contains(&format!("\nprofile {DEFAULT_PROFILE} ")));
        assert!(text.contains("  deny mount,\n"));
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    /// The profile compiles (parsed and compiled by the node's apparmor_parser, not loaded: -Q).
    /// scripts/setup installs Debian's `apparmor` package for this.
    #[test]
    fn apparmor_parser_compiles_the_default_profile() {
        let mut child = Command::new("apparmor_parser")
            .args(["-Q", "-K"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("apparmor_parser (Debian package apparmor; scripts/setup installs it)");
        child.stdin.take().unwrap().write_all(default_profile().as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
}
