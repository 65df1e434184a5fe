//! Id mappings in init: the user namespaces that idmapped mounts take their mapping from, and the
//! translation of container ids to host ids for what init creates as the node's root on behalf
//! of a container in a user namespace.
//!
//! An idmapped mount needs a user namespace fd that carries the mapping. init makes one per
//! distinct mapping with a short-lived child (unshare(CLONE_NEWUSER), maps written by init, the
//! namespace kept through an open fd), before it enters any namespace: the child must not become
//! PID 1 of the container's PID namespace, and init's /proc must show it.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid};
use oci_spec::runtime::{LinuxIdMapping, Mount, Spec};

use crate::spec::InitSpec;
use crate::{Context, Error, Result};

/// uid and gid mappings, as a user namespace's uid_map and gid_map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Mappings {
    pub uids: Vec<LinuxIdMapping>,
    pub gids: Vec<LinuxIdMapping>,
}

impl Mappings {
    pub(crate) fn of_mount(m: &Mount) -> Option<Mappings> {
        let uids = m.uid_mappings().clone().unwrap_or_default();
        let gids = m.gid_mappings().clone().unwrap_or_default();
        (!uids.is_empty() || !gids.is_empty()).then_some(Mappings { uids, gids })
    }

    /// The user namespace's mappings (`linux.uidMappings`/`gidMappings`).
    pub(crate) fn of_spec(spec: &Spec) -> Option<Mappings> {
        let linux = spec.linux().as_ref()?;
        let uids = linux.uid_mappings().clone().unwrap_or_default();
        let gids = linux.gid_mappings().clone().unwrap_or_default();
        (!uids.is_empty() || !gids.is_empty()).then_some(Mappings { uids, gids })
    }

    /// Checks what the kernel would refuse with a bare EINVAL: both maps given, at most 340 lines,
    /// no empty or overflowing line.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        for (kind, map) in [("uid", &self.uids), ("gid", &self.gids)] {
            if map.is_empty() {
                return Err(Error::invalid(format!(
                    "{what}: {kind} mappings are missing (uid and gid mappings go together)"
                )));
            }
            if map.len() > 340 {
                return Err(Error::invalid(format!("{what}: more than 340 {kind} mappings")));
            }
            for line in map {
                let fits = |start: u32| u64::from(start) + u64::from(line.size()) <= u64::from(u32::MAX);
                if line.size() == 0 || !fits(line.container_id()) || !fits(line.host_id()) {
                    return Err(Error::invalid(format!(
                        "{what}: {kind} mapping {} {} {} is empty or goes beyond 4294967294",
                        line.container_id(),
                        line.host_id(),
                        line.size()
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn host_uid(&self, id: u32) -> Option<u32> {
        to_host(&self.uids, id)
    }

    pub(crate) fn host_gid(&self, id: u32) -> Option<u32> {
        to_host(&self.gids, id)
    }

    /// The map file text: one "container host size" line per mapping.
    fn text(map: &[LinuxIdMapping]) -> String {
        map.iter().map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size())).collect()
    }
}

fn to_host(map: &[LinuxIdMapping], id: u32) -> Option<u32> {
    map.iter()
        .find(|m| id >= m.container_id() && u64::from(id) < u64::from(m.container_id()) + u64::from(m.size()))
        .map(|m| m.host_id() + (id - m.container_id()))
}

/// The user namespaces of the idmapped mounts of one container, one per distinct mapping.
#[derive(Debug, Default)]
pub(crate) struct IdmapNamespaces {
    namespaces: Vec<(Mappings, OwnedFd)>,
}

impl IdmapNamespaces {
    /// Makes a user namespace for every mapping the spec's idmapped mounts and overlay lowers use.
    pub(crate) fn prepare(spec: &InitSpec) -> Result<IdmapNamespaces> {
        let mut wanted: Vec<(String, Mappings)> = Vec::new();
        if let Some(overlay) = &spec.rootfs
            && (!overlay.uid_mappings.is_empty() || !overlay.gid_mappings.is_empty())
        {
            let mappings = Mappings { uids: overlay.uid_mappings.clone(), gids: overlay.gid_mappings.clone() };
            wanted.push(("overlay rootfs lower dirs".into(), mappings));
        }
        for volume in &spec.image_volumes {
            if !volume.overlay.uid_mappings.is_empty() || !volume.overlay.gid_mappings.is_empty() {
                let mappings =
                    Mappings { uids: volume.overlay.uid_mappings.clone(), gids: volume.overlay.gid_mappings.clone() };
                wanted.push((format!("image volume on {}", volume.destination.display()), mappings));
            }
        }
        for m in spec.oci.mounts().as_deref().unwrap_or_default() {
            if let Some(mappings) = mount_mappings(&spec.oci, m)? {
                wanted.push((format!("idmapped mount on {}", m.destination().display()), mappings));
            }
        }
        let mut made = IdmapNamespaces::default();
        for (what, mappings) in wanted {
            mappings.check(&what)?;
            if made.get(&mappings).is_none() {
                let fd = user_namespace(&mappings)
                    .map_err(|e| e.context(format!("{what}: user namespace for the id mapping")))?;
                made.namespaces.push((mappings, fd));
            }
        }
        Ok(made)
    }

    pub(crate) fn get(&self, mappings: &Mappings) -> Option<&OwnedFd> {
        self.namespaces.iter().find(|(m, _)| m == mappings).map(|(_, fd)| fd)
    }
}

/// The mappings an idmapped bind mount uses: its own, or (option `idmap`/`ridmap` without any)
/// the container's user namespace's, as runc does. None for a mount that is not idmapped.
pub(crate) fn mount_mappings(spec: &Spec, m: &Mount) -> Result<Option<Mappings>> {
    let options = m.options().as_deref().unwrap_or_default();
    let asks = options.iter().any(|o| o == "idmap" || o == "ridmap");
    match Mappings::of_mount(m) {
        Some(mappings) => Ok(Some(mappings)),
        None if asks => match Mappings::of_spec(spec) {
            Some(mappings) => Ok(Some(mappings)),
            None => Err(Error::invalid(format!(
                "mount on {}: option idmap needs uidMappings and gidMappings (on the mount or the container)",
                m.destination().display()
            ))),
        },
        None => Ok(None),
    }
}

/// A new user namespace with `mappings`, held by the returned fd (nothing else keeps it).
fn user_namespace(mappings: &Mappings) -> Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::Errno)?;
    let (done_r, done_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::Errno)?;
    // SAFETY: the child only makes raw system calls (unshare, write, read, _exit: async-signal-safe,
    // no allocation, no lock), so forking is sound in init (single-threaded) and in the daemon's
    // preflight (threads) alike.
    let child = match unsafe { nix::unistd::fork() }.map_err(Error::Errno)? {
        ForkResult::Child => {
            drop(ready_r);
            drop(done_w);
            let code = match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
                Ok(()) => {
                    let _ = nix::unistd::write(&ready_w, b"u");
                    // Wait until the parent has the namespace (EOF when it closes its end).
                    let _ = nix::unistd::read(&done_r, &mut [0u8; 1]);
                    0
                }
                Err(e) => {
                    let _ = nix::unistd::write(&ready_w, (e as i32).to_ne_bytes().as_slice());
                    1
                }
            };
            // SAFETY: _exit is always allowed; no destructors of the parent's state run twice.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let result = (|| {
        let mut reply = [0u8; 4];
        let n = read_retrying(&ready_r, &mut reply)?;
        match n {
            1 => {}
            4 => return Err(Errno::from_raw(i32::from_ne_bytes(reply))).ctx(|| "unshare".into()),
            _ => return Err(Error::new("the helper process died")),
        }
        for (file, map) in [("uid_map", &mappings.uids), ("gid_map", &mappings.gids)] {
            std::fs::write(format!("/proc/{child}/{file}"), Mappings::text(map))
                .map_err(|source| Error::File { what: format!("write {file}"), source })?;
        }
        nix::fcntl::open(format!("/proc/{child}/ns/user").as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .ctx(|| "open the namespace".into())
    })();
    drop(done_w);
    reap(child);
    result
}

fn read_retrying(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize> {
    loop {
        match nix::unistd::read(fd.as_fd(), buf) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(Error::Errno),
        }
    }
}

fn reap(child: Pid) {
    while let Err(Errno::EINTR) = waitpid(child, None) {}
}

/// mount_setattr(MOUNT_ATTR_IDMAP) on a detached mount `tree` (from open_tree(OPEN_TREE_CLONE)):
/// the mapping of `userns` applies to the mount (and, with `recursive`, to its submounts).
pub(crate) fn idmap_tree(tree: &OwnedFd, userns: &OwnedFd, recursive: bool) -> Result<()> {
    let flags = libc::AT_EMPTY_PATH as libc::c_uint | if recursive { libc::AT_RECURSIVE as libc::c_uint } else { 0 };
    crate::mount_setattr::mount_setattr(tree.as_fd(), c"", flags, libc::MOUNT_ATTR_IDMAP, Some(userns.as_fd()))
        .ctx(|| "set the id mapping (mount_setattr MOUNT_ATTR_IDMAP)".into())
}

/// Whether a mount of `dir` can be idmapped here: a user namespace mapping 0..65535 to
/// `host_base..`, a detached clone of `dir` (open_tree(OPEN_TREE_CLONE)) and
/// mount_setattr(MOUNT_ATTR_IDMAP) on it, exactly what init does to each image layer before it
/// becomes an overlay lower. Nothing is attached: the clone goes with its fd. For the preflight
/// (`cri-systemd check`); the child forked for the namespace only makes raw system calls, so the
/// daemon's threads do not matter.
pub fn probe_idmapped_mount(dir: &std::path::Path, host_base: u32) -> Result<()> {
    let line = |host: u32| -> Result<LinuxIdMapping> {
        serde_json::from_value(serde_json::json!({"containerID": 0, "hostID": host, "size": 65536}))
            .map_err(|e| Error::new(format!("id mapping: {e}")))
    };
    let mappings = Mappings { uids: vec![line(host_base)?], gids: vec![line(host_base)?] };
    mappings.check("probe")?;
    let userns = user_namespace(&mappings).map_err(|e| e.context("user namespace for the id mapping"))?;
    let flags = rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let tree = rustix::mount::open_tree(rustix::fs::CWD, dir, flags)
        .ctx(|| format!("clone a mount of {} (open_tree)", dir.display()))?;
    idmap_tree(&tree, &userns, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(container: u32, host: u32, size: u32) -> LinuxIdMapping {
        let json = format!(r#"{{"containerID": {container}, "hostID": {host}, "size": {size}}}"#);
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn ids_translate_through_the_maps() {
        let m = Mappings { uids: vec![line(0, 0x9_0000, 65536)], gids: vec![line(0, 0xA_0000, 100), line(100, 5, 1)] };
        assert_eq!(m.host_uid(0), Some(0x9_0000));
        assert_eq!(m.host_uid(65535), Some(0x9_FFFF));
        assert_eq!(m.host_uid(65536), None);
        assert_eq!(m.host_gid(5), Some(0xA_0005));
        assert_eq!(m.host_gid(100), Some(5));
        assert_eq!(Mappings::text(&m.gids), "0 655360 100\n100 5 1\n");
        m.check("t").unwrap();
        let half = Mappings { uids: m.uids.clone(), gids: vec![] };
        assert!(half.check("t").unwrap_err().to_string().contains("gid mappings are missing"));
        let overflow = Mappings { uids: vec![line(0, u32::MAX - 10, 65536)], gids: m.gids.clone() };
        assert!(overflow.check("t").is_err());
    }
}
