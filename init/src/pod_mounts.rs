//! The daemon's pod mount namespace, seen from init, pod-init and restore-in: the pods' pinned
//! IPC, UTS, user and PID namespaces and their /dev/shm tmpfs are mounts of a mount namespace of
//! the daemon's (pinned at a path of the node's), not of the node's. Every mount of the node's
//! namespace is copied by each container's unshare(CLONE_NEWNS) and parsed by systemd at every
//! change: four mounts per pod there made container starts grow with the pods on the node.
//!
//! These processes start in the node's mount namespace. Before anything else they step into
//! the pod mount namespace (they are single-threaded: setns of a mount namespace needs that),
//! open what they need there (namespace files as descriptors, /dev/shm as a detached clone of its
//! tree) and step back; the container's own mount namespace is then a copy of the node's, with
//! the clones attached at their paths in it only.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};
use serde::{Deserialize, Serialize};

use crate::{Context, Result};

/// What of a pod lives in the daemon's pod mount namespace, as the daemon tells init.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMounts {
    /// The pinned mount namespace (a file of the node's mount namespace).
    pub namespace: PathBuf,
    /// Namespace pins to open there rather than in the node's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<PathBuf>,
    /// Mounts to clone there and attach at the same paths in the container's mount namespace
    /// (the pod's /dev/shm), before its bind mounts are made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trees: Vec<PathBuf>,
}

/// What was opened in the pod mount namespace.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    pub pins: Vec<(PathBuf, OwnedFd)>,
    pub trees: Vec<(PathBuf, OwnedFd)>,
}

impl Opened {
    /// The descriptor of `path` if it was opened in the pod mount namespace.
    pub(crate) fn take_pin(&mut self, path: &Path) -> Option<OwnedFd> {
        let i = self.pins.iter().position(|(p, _)| p == path)?;
        Some(self.pins.swap_remove(i).1)
    }
}

impl PodMounts {
    /// Steps into the pod mount namespace, opens the pins and clones the trees, and steps back
    /// (root and working directory as they were). The caller must be single-threaded.
    pub(crate) fn open(&self) -> Result<Opened> {
        let open = |path: &Path, what: &str| {
            nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                .ctx(|| format!("open {what} {}", path.display()))
        };
        let node = open(Path::new("/proc/self/ns/mnt"), "the node's mount namespace")?;
        let pods = open(&self.namespace, "the pod mount namespace")?;
        let cwd = nix::fcntl::open(".", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .ctx(|| "open the working directory".into())?;
        nix::sched::setns(&pods, CloneFlags::CLONE_NEWNS)
            .ctx(|| format!("join the pod mount namespace {}", self.namespace.display()))?;
        let opened = (|| -> Result<Opened> {
            let mut opened = Opened::default();
            for pin in &self.pins {
                opened.pins.push((pin.clone(), open(pin, "namespace")?));
            }
            for path in &self.trees {
                let flags =
                    OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE;
                let tree = rustix::mount::open_tree(rustix::fs::CWD, path, flags)
                    .ctx(|| format!("clone the pod's mount {}", path.display()))?;
                opened.trees.push((path.clone(), tree));
            }
            Ok(opened)
        })();
        // Back in any case: what follows must see the node's mounts. (setns of a mount namespace
        // sets the root and working directory to its root: the old ones come back.)
        nix::sched::setns(&node, CloneFlags::CLONE_NEWNS).ctx(|| "go back to the node's mount namespace".into())?;
        nix::unistd::fchdir(&cwd).ctx(|| "go back to the working directory".into())?;
        opened
    }
}

/// Attaches the cloned trees at their own paths, in the caller's mount namespace (a private one:
/// after unshare and / made a slave, so nothing of it reaches the node's).
pub(crate) fn attach_trees(trees: &[(PathBuf, OwnedFd)]) -> Result<()> {
    for (path, tree) in trees {
        rustix::mount::move_mount(tree, c"", rustix::fs::CWD, path, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .ctx(|| format!("attach the pod's mount {}", path.display()))?;
    }
    Ok(())
}
