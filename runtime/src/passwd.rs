//! Users and groups as the image's own /etc/passwd and /etc/group define them, read from the
//! image's layers (the topmost layer that has the file wins, as in the merged rootfs).

use std::path::PathBuf;

use crate::Error;

/// The identity a container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Finds `relative` (e.g. `etc/passwd`) in the topmost layer that has it.
fn image_file(lowerdirs: &[PathBuf], relative: &str) -> Option<String> {
    for dir in lowerdirs {
        let path = dir.join(relative);
        match std::fs::symlink_metadata(&path) {
            // A regular file only: a symlink in a layer could point anywhere on the host.
            Ok(meta) if meta.file_type().is_file() => return std::fs::read_to_string(path).ok(),
            // An overlay whiteout (char device 0:0) or anything else hides lower copies.
            Ok(_) => return None,
            Err(_) => {}
        }
    }
    None
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

fn passwd(lowerdirs: &[PathBuf]) -> Vec<PasswdEntry> {
    image_file(lowerdirs, "etc/passwd")
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
        .collect()
}

/// (group name, gid, members)
fn groups(lowerdirs: &[PathBuf]) -> Vec<(String, u32, Vec<String>)> {
    image_file(lowerdirs, "etc/group")
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
        .collect()
}

/// Who the process runs as. `user` is a user name or number, `group` an optional group name or
/// number (the image config's `USER user[:group]`, or the CRI's run_as_username / run_as_user and
/// run_as_group); `extra_gids` are the pod's supplemental groups. A named user or group that the
/// image does not define is an error, as with runc; a numeric one needs no entry.
pub fn resolve(lowerdirs: &[PathBuf], user: &str, group: Option<&str>, extra_gids: &[u32]) -> Result<Identity, Error> {
    let users = passwd(lowerdirs);
    let (uid, mut gid, name) = if user.is_empty() {
        (0, 0, users.iter().find(|u| u.uid == 0).map(|u| u.name.clone()))
    } else if let Ok(uid) = user.parse::<u32>() {
        match users.iter().find(|u| u.uid == uid) {
            Some(entry) => (uid, entry.gid, Some(entry.name.clone())),
            None => (uid, 0, None),
        }
    } else {
        let entry = users.iter().find(|u| u.name == user).ok_or_else(|| {
            Error::InvalidArgument(format!("unable to find user {user}: no matching entries in passwd file"))
        })?;
        (entry.uid, entry.gid, Some(entry.name.clone()))
    };
    let all_groups = groups(lowerdirs);
    if let Some(group) = group.filter(|g| !g.is_empty()) {
        gid = match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups.iter().find(|(n, _, _)| n == group).map(|(_, gid, _)| *gid).ok_or_else(|| {
                Error::InvalidArgument(format!("unable to find group {group}: no matching entries in group file"))
            })?,
        };
    }
    let mut additional_gids: Vec<u32> = match &name {
        Some(name) => {
            all_groups.iter().filter(|(_, _, members)| members.contains(name)).map(|(_, gid, _)| *gid).collect()
        }
        None => Vec::new(),
    };
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
        assert_eq!(resolve(&layers, "", None, &[]).unwrap(), Identity { uid: 0, gid: 0, additional_gids: vec![] });
        assert_eq!(
            resolve(&layers, "www-data", None, &[]).unwrap(),
            Identity { uid: 33, gid: 33, additional_gids: vec![50] }
        );
        assert_eq!(
            resolve(&layers, "1000", None, &[7]).unwrap(),
            Identity { uid: 1000, gid: 1001, additional_gids: vec![7, 50] }
        );
        assert_eq!(
            resolve(&layers, "4242", Some("4343"), &[]).unwrap(),
            Identity { uid: 4242, gid: 4343, additional_gids: vec![] }
        );
        assert_eq!(resolve(&layers, "app", Some("staff"), &[]).unwrap().gid, 50);
        assert!(resolve(&layers, "nobody-here", None, &[]).is_err());
        assert!(resolve(&layers, "app", Some("nogroup"), &[]).is_err());
        assert_eq!(split_user("www-data:1004"), ("www-data", Some("1004")));
    }
}
