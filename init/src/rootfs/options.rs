//! Mount options of the spec's mounts: flags, propagation and file system data.

use std::path::Path;

use nix::mount::MsFlags;

use crate::{Error, Result};

pub(super) enum MountOption {
    Set(MsFlags),
    Clear(MsFlags),
    Propagation(MsFlags),
    /// `rro`: read-only, recursively (mount_setattr).
    RecursiveReadonly,
    Ignored,
    Unsupported,
    Data,
}

pub(super) fn parse_option(option: &str) -> MountOption {
    use MountOption::*;
    use MsFlags as F;
    match option {
        "defaults" => Set(F::empty()),
        "ro" => Set(F::MS_RDONLY),
        "rw" => Clear(F::MS_RDONLY),
        "suid" => Clear(F::MS_NOSUID),
        "nosuid" => Set(F::MS_NOSUID),
        "dev" => Clear(F::MS_NODEV),
        "nodev" => Set(F::MS_NODEV),
        "exec" => Clear(F::MS_NOEXEC),
        "noexec" => Set(F::MS_NOEXEC),
        "sync" => Set(F::MS_SYNCHRONOUS),
        "async" => Clear(F::MS_SYNCHRONOUS),
        "dirsync" => Set(F::MS_DIRSYNC),
        "mand" => Set(F::MS_MANDLOCK),
        "nomand" => Clear(F::MS_MANDLOCK),
        "atime" => Clear(F::MS_NOATIME),
        "noatime" => Set(F::MS_NOATIME),
        "diratime" => Clear(F::MS_NODIRATIME),
        "nodiratime" => Set(F::MS_NODIRATIME),
        "relatime" => Set(F::MS_RELATIME),
        "norelatime" => Clear(F::MS_RELATIME),
        "strictatime" => Set(F::MS_STRICTATIME),
        "nostrictatime" => Clear(F::MS_STRICTATIME),
        "lazytime" => Set(F::MS_LAZYTIME),
        "nolazytime" => Clear(F::MS_LAZYTIME),
        "iversion" => Set(F::MS_I_VERSION),
        "noiversion" => Clear(F::MS_I_VERSION),
        "silent" => Set(F::MS_SILENT),
        "loud" => Clear(F::MS_SILENT),
        "bind" => Set(F::MS_BIND),
        "rbind" => Set(F::MS_BIND | F::MS_REC),
        "remount" => Set(F::MS_REMOUNT),
        "private" => Propagation(F::MS_PRIVATE),
        "rprivate" => Propagation(F::MS_PRIVATE | F::MS_REC),
        "shared" => Propagation(F::MS_SHARED),
        "rshared" => Propagation(F::MS_SHARED | F::MS_REC),
        "slave" => Propagation(F::MS_SLAVE),
        "rslave" => Propagation(F::MS_SLAVE | F::MS_REC),
        "unbindable" => Propagation(F::MS_UNBINDABLE),
        "runbindable" => Propagation(F::MS_UNBINDABLE | F::MS_REC),
        "rro" => RecursiveReadonly,
        // tmpfs copy-up of the image's content under a tmpfs mount: not done (the mount is empty).
        "tmpcopyup" => Ignored,
        // Applied when the source is cloned (clone_bind_source).
        "idmap" | "ridmap" => Ignored,
        "rrw" | "rnosuid" | "rsuid" | "rnodev" | "rdev" | "rnoexec" | "rexec" | "rnoatime" | "ratime" | "rrelatime"
        | "rnorelatime" | "rstrictatime" | "rnostrictatime" | "rnodiratime" | "rdiratime" => Unsupported,
        _ => Data,
    }
}

#[derive(Debug)]
pub(super) struct MountOptions {
    pub(super) flags: MsFlags,
    pub(super) propagation: Vec<MsFlags>,
    pub(super) recursive_readonly: bool,
    pub(super) data: Vec<String>,
}

pub(super) fn parse_options(options: &[String], dest: &Path) -> Result<MountOptions> {
    let mut parsed =
        MountOptions { flags: MsFlags::empty(), propagation: Vec::new(), recursive_readonly: false, data: Vec::new() };
    for option in options {
        match parse_option(option) {
            MountOption::Set(f) => parsed.flags |= f,
            MountOption::Clear(f) => parsed.flags &= !f,
            MountOption::Propagation(f) => parsed.propagation.push(f),
            MountOption::RecursiveReadonly => parsed.recursive_readonly = true,
            MountOption::Ignored => {}
            MountOption::Unsupported => {
                return Err(Error::invalid(format!("mount {}: option {option:?} is not supported", dest.display())));
            }
            MountOption::Data => parsed.data.push(option.clone()),
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let options: Vec<String> =
            ["rbind", "ro", "nosuid", "rslave", "mode=755", "size=64k", "rw"].iter().map(|s| s.to_string()).collect();
        let parsed = parse_options(&options, Path::new("/x")).unwrap();
        assert_eq!(parsed.flags, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID);
        assert_eq!(parsed.propagation, vec![MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(parsed.data, vec!["mode=755", "size=64k"]);
        assert!(parse_options(&["rnosuid".to_string()], Path::new("/x")).is_err());
        assert!(parse_options(&["idmap".to_string()], Path::new("/x")).is_ok());
    }
}
