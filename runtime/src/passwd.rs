//! Users and groups as the image's own /etc/passwd and /etc/group define them, read from the
//! image's layers (the topmost layer that has the file wins, as in the merged rootfs).
//!
//! Supplementary groups follow the CRI's SupplementalGroupsPolicy (KEP-3619): Merge adds the
//! groups the image's /etc/group lists the user in to the config's `supplemental_groups`; Strict
//! takes only those. Either way the primary gid is among them, as containerd sets it, and that
//! list is what ContainerStatus.user reports.

use std::path::PathBuf;

use crate::Error;

/// The identity a container process runs with.
/// As containerd does, the primary gid is always among the additional ones: that is what the
/// process's supplementary groups hold, and what ContainerStatus.user reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// The largest /etc/passwd or /etc/group read from an image: real ones are a few KiB; the cap
/// keeps a hostile image from filling the daemon's memory (as the manifest cap does for
/// registries).
pub(crate) const MAX_USER_DB_BYTES: u64 = 4 << 20;

/// Reads `relative` (e.g. `etc/passwd`) from the topmost layer that has it, resolved beneath that
/// layer's directory without following any symlink or crossing a mount (a layer's `etc` could
/// be a symlink to the node's /etc, its `passwd` one to /proc/self/...), as a regular file only
/// (never a device or fifo of the image: it is first opened O_PATH), at most
/// [`MAX_USER_DB_BYTES`]. A symlink, whiteout or anything but a regular file hides lower copies,
/// as in the merged root file system, where its target would be the container's, not ours.
fn image_file(lowerdirs: &[PathBuf], relative: &str) -> Result<Option<String>, Error> {
    use nix::errno::Errno;
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use std::io::Read;

    for dir in lowerdirs {
        let Ok(layer) = std::fs::File::open(dir) else { continue };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV);
        let path = loop {
            match openat2(&layer, relative, how) {
                // A rename raced with the resolution: try again.
                Err(Errno::EAGAIN) => continue,
                other => break other,
            }
        };
        let path = match path {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            // A symlink on the way (ELOOP), or a component that is no directory: hidden.
            Err(_) => return Ok(None),
        };
        let stat = nix::sys::stat::fstat(&path).map_err(|e| Error::Io {
            what: format!("cannot stat the image's /{relative}"),
            source: std::io::Error::from(e),
        })?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        if stat.st_size as u64 > MAX_USER_DB_BYTES {
            return Err(Error::InvalidSpec(format!(
                "the image's /{relative} is {} bytes, over the {MAX_USER_DB_BYTES}-byte limit",
                stat.st_size
            )));
        }
        // Reopened for reading through the O_PATH descriptor: the very file that was checked.
        let file = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&path)))
            .map_err(|e| Error::Io { what: format!("cannot open the image's /{relative}"), source: e })?;
        let mut bytes = Vec::with_capacity(stat.st_size as usize);
        file.take(MAX_USER_DB_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::Io { what: format!("cannot read the image's /{relative}"), source: e })?;
        if bytes.len() as u64 > MAX_USER_DB_BYTES {
            return Err(Error::InvalidSpec(format!(
                "the image's /{relative} is over the {MAX_USER_DB_BYTES}-byte limit"
            )));
        }
        return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
    }
    Ok(None)
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

fn passwd(lowerdirs: &[PathBuf]) -> Result<Vec<PasswdEntry>, Error> {
    Ok(image_file(lowerdirs, "etc/passwd")?
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            })
        })
        .collect())
}

/// (group name, gid, members)
fn groups(lowerdirs: &[PathBuf]) -> Result<Vec<(String, u32, Vec<String>)>, Error> {
    Ok(image_file(lowerdirs, "etc/group")?
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            let members = fields[3].split(',').filter(|m| !m.is_empty()).map(String::from).collect();
            Some((fields[0].to_string(), fields[2].parse().ok()?, members))
        })
        .collect())
}

/// Who the process runs as. `user` is a user name or number, `group` an optional group name or
/// number (the image config's `USER user[:group]`, or the CRI's run_as_username / run_as_user and
/// run_as_group); `extra_gids` are the pod's supplemental groups. A named user or group that the
/// image does not define is an error, as with runc; a numeric one needs no entry.
/// `image_groups`: the groups the image's /etc/group lists the user in are added (the CRI's
/// SupplementalGroupsPolicy Merge); without it (Strict) only the primary and `extra_gids` are.
pub fn resolve(
    lowerdirs: &[PathBuf],
    user: &str,
    group: Option<&str>,
    extra_gids: &[u32],
    image_groups: bool,
) -> Result<Identity, Error> {
    let users = passwd(lowerdirs)?;
    let (uid, mut gid, name) = if user.is_empty() {
        (0, 0, users.iter().find(|u| u.uid == 0).map(|u| u.name.clone()))
    } else if let Ok(uid) = user.parse::<u32>() {
        match users.iter().find(|u| u.uid == uid) {
            Some(entry) => (uid, entry.gid, Some(entry.name.clone())),
            None => (uid, 0, None),
        }
    } else {
        let entry = users.iter().find(|u| u.name == user).ok_or_else(|| {
            Error::InvalidSpec(format!("unable to find user {user}: no matching entries in passwd file"))
        })?;
        (entry.uid, entry.gid, Some(entry.name.clone()))
    };
    let all_groups = groups(lowerdirs)?;
    if let Some(group) = group.filter(|g| !g.is_empty()) {
        gid = match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups.iter().find(|(n, _, _)| n == group).map(|(_, gid, _)| *gid).ok_or_else(|| {
                Error::InvalidSpec(format!("unable to find group {group}: no matching entries in group file"))
            })?,
        };
    }
    let mut additional_gids: Vec<u32> = match &name {
        Some(name) if image_groups => {
            all_groups.iter().filter(|(_, _, members)| members.contains(name)).map(|(_, gid, _)| *gid).collect()
        }
        _ => Vec::new(),
    };
    additional_gids.push(gid);
    additional_gids.extend_from_slice(extra_gids);
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(Identity { uid, gid, additional_gids })
}

/// Splits an image config USER (`name`, `uid`, `name:group`, `uid:gid`) into user and group.
pub fn split_user(user: &str) -> (&str, Option<&str>) {
    match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let (top, bottom) = (dir.path().join("top"), dir.path().join("bottom"));
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::create_dir_all(bottom.join("etc")).unwrap();
        std::fs::write(bottom.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(
            top.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(top.join("etc/group"), "root:x:0:\nwww-data:x:33:\nstaff:x:50:app,www-data\napp:x:1001:\n")
            .unwrap();
        (dir, vec![top, bottom])
    }

    #[test]
    fn names_numbers_and_groups() {
        let (_dir, layers) = image();
        assert_eq!(
            resolve(&layers, "", None, &[], true).unwrap(),
            Identity { uid: 0, gid: 0, additional_gids: vec![0] }
        );
        assert_eq!(
            resolve(&layers, "www-data", None, &[], true).unwrap(),
            Identity { uid: 33, gid: 33, additional_gids: vec![33, 50] }
        );
        assert_eq!(
            resolve(&layers, "1000", None, &[7], true).unwrap(),
            Identity { uid: 1000, gid: 1001, additional_gids: vec![7, 50, 1001] }
        );
        // Strict: the image's /etc/group adds nothing.
        assert_eq!(
            resolve(&layers, "1000", None, &[7], false).unwrap(),
            Identity { uid: 1000, gid: 1001, additional_gids: vec![7, 1001] }
        );
        assert_eq!(
            resolve(&layers, "4242", Some("4343"), &[], true).unwrap(),
            Identity { uid: 4242, gid: 4343, additional_gids: vec![4343] }
        );
        assert_eq!(resolve(&layers, "app", Some("staff"), &[], true).unwrap().gid, 50);
        assert!(resolve(&layers, "nobody-here", None, &[], true).is_err());
        assert!(resolve(&layers, "app", Some("nogroup"), &[], true).is_err());
        assert_eq!(split_user("www-data:1004"), ("www-data", Some("1004")));
    }

    #[test]
    fn never_follows_a_symlink_out_of_a_layer_nor_reads_a_huge_file() {
        let (dir, layers) = image();
        let host = dir.path().join("host");
        std::fs::create_dir_all(host.join("etc")).unwrap();
        std::fs::write(host.join("etc/passwd"), "hostonly:x:4711:4711::/:/bin/sh\n").unwrap();
        // `etc` of the top layer is a symlink to the "node's" etc: hides the lower layers' too.
        let top = dir.path().join("evil");
        std::fs::create_dir_all(&top).unwrap();
        std::os::unix::fs::symlink(host.join("etc"), top.join("etc")).unwrap();
        let evil: Vec<PathBuf> = [top.clone()].into_iter().chain(layers.iter().cloned()).collect();
        assert!(resolve(&evil, "hostonly", None, &[], true).is_err());
        assert!(resolve(&evil, "app", None, &[], true).is_err(), "the symlinked etc hides the lower layers");
        // `etc/passwd` a symlink to /proc/self/...
        std::fs::remove_file(top.join("etc")).unwrap();
        std::fs::create_dir(top.join("etc")).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", top.join("etc/passwd")).unwrap();
        assert!(image_file(&evil, "etc/passwd").unwrap().is_none());
        // A fifo is not opened (it would block).
        std::fs::remove_file(top.join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(&top.join("etc/passwd"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(image_file(&evil, "etc/passwd").unwrap().is_none());
        // A file over the cap is refused, whatever it holds.
        std::fs::remove_file(top.join("etc/passwd")).unwrap();
        let file = std::fs::File::create(top.join("etc/passwd")).unwrap();
        file.set_len(MAX_USER_DB_BYTES + 1).unwrap();
        let err = resolve(&evil, "root", None, &[], true).unwrap_err();
        assert!(err.to_string().contains("4194304-byte limit"), "{err}");
    }
}
