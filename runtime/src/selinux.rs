//! SELinux: cri-systemd applies no SELinux labels. On a node where SELinux is enabled, a request
//! that carries SELinux options is refused rather than run unlabelled; on a node without SELinux
//! such options are ignored, as containerd ignores them there.

use std::path::Path;

/// Whether the node runs SELinux (selinuxfs mounted, as libselinux's `is_selinux_enabled` checks).
pub fn node_enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

/// The refusal for a request with SELinux options on an SELinux node; None where they are ignored.
pub fn refusal(what: &str, options_given: bool) -> Option<String> {
    (options_given && node_enabled()).then(|| {
        format!("{what} has SELinux options, but cri-systemd applies no SELinux labels and this node runs SELinux")
    })
}
