//! Checkpoint of a running container with CRIU (CheckpointContainer: the kubelet's checkpoint
//! API, `crictl checkpoint`), into the archive layout that checkpointctl reads and that
//! containerd and CRI-O write:
//!
//! ```text
//! config.dump       checkpointctl's ContainerConfig: id, name, image, times
//! spec.dump         the OCI runtime spec the container runs with (init.json's `oci`)
//! status.dump       the container's CRI status (Go JSON field names, as containerd marshals it)
//! checkpoint/       CRIU's images (`criu dump --leave-running`: the container keeps running)
//! rootfs-diff.tar   the writable layer's files (overlay whiteouts left out)
//! deleted.files     JSON list of the paths the writable layer deletes (its whiteouts)
//! dump.log          CRIU's log; container.log: the CRI log so far
//! ```
//!
//! What CRIU is told about a container of ours:
//! - its tree is the unit's main process and its children (the entrypoint is PID 1 of its own
//!   PID namespace; init made it a session leader, which CRIU requires);
//! - the pod's network namespace is external (`--external net[<inode>]:extRootNetNS`, runc's key);
//! - every bind mount of the spec (the pod's /dev/shm, /etc/hosts, volumes...) is external
//!   (`--external mnt[<destination>]:<destination>`); the overlay root is the mount namespace's root;
//! - cgroups belong to systemd (`--manage-cgroups=ignore`);
//! - stdout and stderr are pipes whose read ends the daemon holds: their inodes are in
//!   `descriptors.json` (as runc writes it) for a restore to hand the new pipes in their place.
//!
//! - stdin is systemd's /dev/null, a file of the node: `--external file[<mnt_id>:<inode>]`, its key
//!   kept in `checkpoint/external-files.json`.
//!
//! Restore: CreateContainer whose image is the path of such an archive creates a container of the
//! checkpointed image (config.dump's `rootfsImageName`), unpacks `checkpoint/` into its
//! `restore/` directory, `rootfs-diff.tar` onto its writable layer and `deleted.files` as overlay
//! whiteouts there. StartContainer sees `restore/checkpoint/` and makes the unit `Type=forking`
//! with `restore-in` as ExecStart (`init/src/restore.rs`: the root, then `criu restore
//! --restore-detached --pidfile`), so systemd supervises the restored tree like an entrypoint.
//! Everything a restore needs is in the container's directory: a daemon restarted between the
//! two calls restores all the same.
//!
//! Refused with FailedPrecondition: a container that is not running, and one with a terminal (its
//! pty master is the daemon's). A container in a pod with a user namespace is checkpointed (CRIU
//! dumps the user namespace with the rest), but not restored: the new pod has another ID range
//! and its layers are idmapped into it, which `restore-in` does not do (FailedPrecondition at
//! CreateContainer).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use tracing::info;

use crate::container::{Container, ContainerState};
use crate::{Error, Runtime};

/// The archive's members, as checkpointctl's `lib/metadata.go` names them.
pub const CONFIG_DUMP: &str = "config.dump";
pub const SPEC_DUMP: &str = "spec.dump";
pub const STATUS_DUMP: &str = "status.dump";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const ROOTFS_DIFF_TAR: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";
pub const DUMP_LOG: &str = "dump.log";
/// runc's name: the targets of fds 0, 1 and 2 at dump time (`pipe:[inode]`, `/dev/null`...).
pub const DESCRIPTORS_JSON: &str = init::restore::DESCRIPTORS_JSON;
/// In a container's directory: what a container created from a checkpoint archive restores.
pub const RESTORE_DIR: &str = "restore";

/// What CheckpointContainer needs besides the container.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// The archive to write (the request's `location`): an absolute path.
    pub location: PathBuf,
    /// The CRIU binary (config `[checkpoint] criu_path`); a bare name is looked up on PATH.
    pub criu: PathBuf,
}

impl Runtime {
    /// CheckpointContainer: dumps the running container `id` with CRIU, leaving it running, and
    /// writes the archive at `options.location`. Nothing is left behind on failure (a location
    /// that cannot be written is refused before CRIU runs).
    pub async fn checkpoint_container(&self, id: &str, options: &CheckpointOptions) -> Result<(), Error> {
        let entry = self.container_entry(id)?;
        let _guard = entry.operation.clone().lock_owned().await;
        let record = self.refresh(&entry);
        if record.state != ContainerState::Running {
            return Err(Error::ContainerState(format!(
                "container {} is {:?}: only running containers can be checkpointed",
                record.id, record.state
            )));
        }
        if record.spec.tty {
            return Err(Error::ContainerState(format!(
                "container {} has a terminal: its checkpoint is not supported (the pty's master is the daemon's)",
                record.id
            )));
        }
        let main_pid = self.systemd.main_pid(&record.unit).await?;
        if main_pid == 0 {
            return Err(Error::ContainerState(format!("container {} has no main process", record.id)));
        }
        // The archive first: a location that cannot be written fails before anything happens.
        let archive = create_archive_file(&options.location)?;
        let work = self.container_dir(&record.id).join("checkpoint");
        let result = self.checkpoint_into(&record, main_pid, &work, options, archive).await;
        let _ = std::fs::remove_dir_all(&work);
        if result.is_err() {
            let _ = std::fs::remove_file(&options.location);
        }
        result?;
        info!(container = %record.id, location = %options.location.display(), "container checkpointed");
        Ok(())
    }

    async fn checkpoint_into(
        &self,
        record: &Container,
        main_pid: u32,
        work: &Path,
        options: &CheckpointOptions,
        archive: std::fs::File,
    ) -> Result<(), Error> {
        let _ = std::fs::remove_dir_all(work);
        let images = work.join(CHECKPOINT_DIR);
        crate::store::create_private_dir_all(&images)
            .map_err(Error::io(format!("cannot create {}", images.display())))?;
        let init = init::InitSpec::load(&self.container_dir(&record.id).join("init.json"))
            .map_err(|e| Error::InitSpec(e.to_string()))?;
        let descriptors = descriptors(main_pid);
        write_file(&images.join(DESCRIPTORS_JSON), &serde_json::to_vec(&descriptors).unwrap_or_default())?;
        let mut args = dump_args(main_pid, &images, work, &netns_inode(main_pid)?, &bind_destinations(&init.oci));
        let external_files = external_std_files(main_pid);
        for (_, key) in &external_files {
            args.extend(["--external".to_string(), key.clone()]);
        }
        write_file(&images.join(init::restore::EXTERNAL_FILES_JSON), &serde_json::to_vec(&external_files).unwrap())?;
        let criu = options.criu.clone();
        let output = tokio::task::spawn_blocking(move || Command::new(&criu).args(&args).output())
            .await
            .map_err(|e| Error::Exec(format!("criu dump: {e}")))?
            .map_err(|e| Error::Exec(format!("cannot run {}: {e}", options.criu.display())))?;
        if !output.status.success() {
            return Err(Error::Exec(format!(
                "criu dump of container {} failed ({}): {}",
                record.id,
                output.status,
                criu_error(&work.join(DUMP_LOG), &output.stderr)
            )));
        }
        let spec = serde_json::to_vec_pretty(&init.oci).map_err(|e| Error::InitSpec(e.to_string()))?;
        write_file(&work.join(SPEC_DUMP), &spec)?;
        write_file(&work.join(CONFIG_DUMP), &serde_json::to_vec_pretty(&config_dump(record, now_nanos())).unwrap())?;
        write_file(&work.join(STATUS_DUMP), &serde_json::to_vec_pretty(&status_dump(record)).unwrap())?;
        let deleted = write_rootfs_diff(&record.rootfs.upperdir, &work.join(ROOTFS_DIFF_TAR))?;
        write_file(&work.join(DELETED_FILES), &serde_json::to_vec(&deleted).unwrap())?;
        if let Some(log) = self.log_path(&record.id) {
            let _ = std::fs::copy(log, work.join("container.log"));
        }
        let work = work.to_path_buf();
        let location = options.location.clone();
        tokio::task::spawn_blocking(move || write_archive(archive, &work))
            .await
            .map_err(|e| Error::Exec(format!("checkpoint archive: {e}")))?
            .map_err(Error::io(format!("cannot write the checkpoint archive {}", location.display())))
    }
}

/// Creates (or truncates) the archive file, 0600 as containerd's: a checkpoint holds the
/// container's memory.
fn create_archive_file(location: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    if !location.is_absolute() {
        return Err(Error::InvalidSpec(format!("location {:?}: not an absolute path", location.display())));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(location)
        .map_err(|e| Error::InvalidSpec(format!("location {}: cannot be written: {e}", location.display())))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(Error::io(format!("cannot write {}", path.display())))
}

/// CRIU's arguments for a dump of the tree of `pid` into `images`, the container left running.
pub(crate) fn dump_args(
    pid: u32,
    images: &Path,
    work: &Path,
    netns_inode: &str,
    bind_destinations: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "dump".into(),
        "--tree".into(),
        pid.to_string(),
        "--images-dir".into(),
        images.to_string_lossy().into_owned(),
        "--work-dir".into(),
        work.to_string_lossy().into_owned(),
        "--log-file".into(),
        DUMP_LOG.into(),
        "-v4".into(),
        "--leave-running".into(),
        "--manage-cgroups=ignore".into(),
        "--tcp-established".into(),
        "--file-locks".into(),
        "--external".into(),
        format!("net[{netns_inode}]:extRootNetNS"),
    ];
    for destination in bind_destinations {
        args.push("--external".into());
        args.push(format!("mnt[{destination}]:{destination}"));
    }
    args
}

/// The destinations of the spec's bind mounts: mounts whose source is outside the container.
pub(crate) fn bind_destinations(oci: &oci_spec::runtime::Spec) -> Vec<String> {
    let mounts = oci.mounts().as_deref().unwrap_or_default();
    mounts
        .iter()
        .filter(|m| {
            m.typ().as_deref() == Some("bind")
                || m.options().as_deref().unwrap_or_default().iter().any(|o| o == "bind" || o == "rbind")
        })
        .map(|m| m.destination().to_string_lossy().into_owned())
        .collect()
}

/// The inode of the network namespace `pid` is in (the pod's).
fn netns_inode(pid: u32) -> Result<String, Error> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map_err(Error::io(format!("cannot read the network namespace of process {pid}")))?;
    let link = link.to_string_lossy();
    link.strip_prefix("net:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .map(str::to_string)
        .ok_or_else(|| Error::Exec(format!("unexpected network namespace link {link:?}")))
}

/// The targets of fds 0, 1 and 2 of `pid`, as runc's descriptors.json.
fn descriptors(pid: u32) -> Vec<String> {
    (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".into())
        })
        .collect()
}

/// CRIU's keys (`file[<mnt_id>:<inode>]`, hex) of the files among fds 0, 1 and 2 of `pid` that
/// are not pipes: systemd's /dev/null for stdin is the node's, on a mount outside the
/// container's mount namespace, which CRIU cannot dump ("Can't lookup mount").
fn external_std_files(pid: u32) -> Vec<(i32, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut keys = Vec::new();
    for fd in 0..3 {
        let Ok(target) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else { continue };
        if !target.is_absolute() {
            continue; // pipe:[...], socket:[...]
        }
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")) else { continue };
        let fdinfo = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let mnt_id = fdinfo.lines().find_map(|l| l.strip_prefix("mnt_id:")).and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(mnt_id) = mnt_id {
            keys.push((fd, format!("file[{mnt_id:x}:{:x}]", meta.ino())));
        }
    }
    keys
}

/// The first error lines of CRIU's log (or its stderr), for the caller's message.
fn criu_error(log: &Path, stderr: &[u8]) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|_| String::from_utf8_lossy(stderr).into_owned());
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).take(3).collect();
    if errors.is_empty() { text.lines().last().unwrap_or("").to_string() } else { errors.join("; ") }
}

/// checkpointctl's ContainerConfig (Go `time.Time` fields as RFC 3339).
pub(crate) fn config_dump(record: &Container, checkpointed_at: i64) -> serde_json::Value {
    json!({
        "id": record.id,
        "name": record.spec.name,
        "rootfsImage": record.spec.image.name,
        "rootfsImageRef": record.spec.image.id,
        "rootfsImageName": record.spec.image.name,
        "runtime": "cri-systemd",
        "createdTime": crate::logs::rfc3339_nanos(record.created_at),
        "checkpointedTime": crate::logs::rfc3339_nanos(checkpointed_at),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": false,
    })
}

/// The container's CRI status as containerd's `json.Marshal` of it writes (Go field names of
/// the generated CRI types, empty fields left out).
pub(crate) fn status_dump(record: &Container) -> serde_json::Value {
    json!({
        "id": record.id,
        "metadata": {"name": record.spec.name, "attempt": record.spec.attempt},
        "state": 1,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "image": {"image": record.spec.image.name},
        "image_ref": record.spec.image.repo_digest,
        "labels": record.spec.labels,
        "annotations": record.spec.annotations,
        "log_path": record.spec.log_path,
        "image_id": record.spec.image.id,
    })
}

/// Writes the writable layer `upper` as a tar at `target`, leaving out overlay whiteouts
/// (character devices 0/0), and returns the paths they delete ("/" + path in the container).
pub(crate) fn write_rootfs_diff(upper: &Path, target: &Path) -> Result<Vec<String>, Error> {
    let file = std::fs::File::create(target).map_err(Error::io(format!("cannot create {}", target.display())))?;
    let scratch = target.parent().unwrap_or(Path::new("/"));
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut deleted = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let dir = upper.join(&relative);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(Error::io(format!("cannot read {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for name in names {
            let path = relative.join(&name);
            let full = upper.join(&path);
            let meta =
                std::fs::symlink_metadata(&full).map_err(Error::io(format!("cannot stat {}", full.display())))?;
            if is_whiteout(&meta) {
                deleted.push(format!("/{}", path.display()));
                continue;
            }
            if meta.is_file() {
                append_file_copy(&mut builder, &full, &path, &meta, scratch)
            } else {
                builder.append_path_with_name(&full, &path)
            }
            .map_err(Error::io(format!("cannot archive {}", full.display())))?;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(Error::io(format!("cannot write {}", target.display())))?;
    deleted.sort();
    Ok(deleted)
}

/// Appends a copy of the regular file `full`: the container runs on (CRIU left it running), and a
/// file it writes while being archived would make the header's size a lie and the rest of the
/// archive unreadable (seen: "numeric field was not a number: when getting cksum" at restore).
fn append_file_copy<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    full: &Path,
    name: &Path,
    meta: &std::fs::Metadata,
    scratch: &Path,
) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut copy = tempfile::tempfile_in(scratch)?;
    let size = std::io::copy(&mut std::fs::File::open(full)?, &mut copy)?;
    copy.seek(SeekFrom::Start(0))?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_size(size);
    builder.append_data(&mut header, name, copy.take(size))
}

fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// The archive: every file of `dir`, under names relative to it.
fn write_archive(file: std::fs::File, dir: &Path) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut names: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    // Names relative to the archive's root, without a "./" entry, as containerd's archive.Diff writes.
    for name in names {
        let path = dir.join(&name);
        if std::fs::symlink_metadata(&path)?.is_dir() {
            builder.append_dir_all(&name, &path)?;
        } else {
            builder.append_path_with_name(&path, &name)?;
        }
    }
    let mut writer = builder.into_inner()?;
    writer.flush()?;
    writer.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// The archive a CreateContainer's image names, if it names one: an absolute path to a file
/// (as CRI-O and containerd 2.x accept a checkpoint archive in place of an image).
pub fn archive_path(image: &str) -> Option<PathBuf> {
    let path = Path::new(image);
    (path.is_absolute() && path.is_file()).then(|| path.to_path_buf())
}

/// The image the checkpointed container ran (config.dump's `rootfsImageName`), which must be on
/// the node for a restore.
pub fn archive_image(archive: &Path) -> Result<String, Error> {
    let bad = |why: String| Error::InvalidSpec(format!("image {}: not a checkpoint archive: {why}", archive.display()));
    let file = std::fs::File::open(archive).map_err(|e| bad(e.to_string()))?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        if path.as_os_str() == CONFIG_DUMP || path == Path::new("./").join(CONFIG_DUMP) {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut (&mut entry).take(1 << 20), &mut text).map_err(|e| bad(e.to_string()))?;
            let config: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| bad(format!("{CONFIG_DUMP}: {e}")))?;
            return ["rootfsImageName", "rootfsImage"]
                .iter()
                .find_map(|k| config[k].as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .ok_or_else(|| bad(format!("{CONFIG_DUMP} names no image")));
        }
    }
    Err(bad(format!("no {CONFIG_DUMP}")))
}

use std::io::Read as _;

impl Runtime {
    /// The rest of CreateContainer from a checkpoint archive: CRIU's images into the container's
    /// `restore/` (StartContainer then restores instead of running the entrypoint), the
    /// checkpointed writable layer onto the new one, its deletions as overlay whiteouts.
    pub async fn prepare_restore(&self, id: &str, archive: &Path, criu: &Path) -> Result<(), Error> {
        let record = self.container(id)?;
        let pod = self.pod(&record.pod_id)?;
        if pod.userns.is_some() {
            return Err(Error::ContainerState(format!(
                "pod {} has a user namespace: restoring a checkpoint into it is not supported (its ID range and idmapped layers differ from the checkpointed container's)",
                pod.id
            )));
        }
        let dir = self.container_dir(id).join(RESTORE_DIR);
        let upper = record.rootfs.upperdir.clone();
        let archive = archive.to_path_buf();
        let criu = criu.to_path_buf();
        tokio::task::spawn_blocking(move || unpack_for_restore(&archive, &dir, &upper, &criu))
            .await
            .map_err(|e| Error::Exec(format!("checkpoint archive: {e}")))?
    }
}

fn unpack_for_restore(archive: &Path, dir: &Path, upper: &Path, criu: &Path) -> Result<(), Error> {
    let what = |e: std::io::Error| Error::InvalidSpec(format!("image {}: {e}", archive.display()));
    crate::store::create_private_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let file = std::fs::File::open(archive).map_err(what)?;
    let mut tar = tar::Archive::new(file);
    let mut deleted: Vec<String> = Vec::new();
    for entry in tar.entries().map_err(what)? {
        let mut entry = entry.map_err(what)?;
        let path = entry.path().map_err(what)?.into_owned();
        let path = path.strip_prefix("./").unwrap_or(&path).to_path_buf();
        if path.starts_with(CHECKPOINT_DIR) {
            // unpack_in refuses paths that leave `dir`.
            entry.unpack_in(dir).map_err(what)?;
        } else if path.as_os_str() == ROOTFS_DIFF_TAR {
            let mut diff = tar::Archive::new(&mut entry);
            diff.set_preserve_permissions(true);
            diff.set_preserve_ownerships(true);
            diff.set_overwrite(true);
            for file in diff.entries().map_err(what)? {
                file.map_err(what)?.unpack_in(upper).map_err(what)?;
            }
        } else if path.as_os_str() == DELETED_FILES {
            let mut text = Vec::new();
            entry.take(16 << 20).read_to_end(&mut text).map_err(what)?;
            deleted = serde_json::from_slice(&text).map_err(|e| what(std::io::Error::other(e)))?;
        }
    }
    if !dir.join(CHECKPOINT_DIR).join("inventory.img").exists() {
        return Err(Error::InvalidSpec(format!("image {}: no CRIU images in the archive", archive.display())));
    }
    for path in deleted {
        let relative = Path::new(&path).strip_prefix("/").unwrap_or(Path::new(&path));
        if relative.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            continue;
        }
        let target = upper.join(relative);
        if let Some(parent) = target.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0);
    }
    write_file(&dir.join("criu"), criu.as_os_str().as_encoded_bytes())
}

/// The restore directory of a container created from a checkpoint archive (None for others).
pub(crate) fn restore_dir(container_dir: &Path) -> Option<PathBuf> {
    let dir = container_dir.join(RESTORE_DIR);
    dir.join(CHECKPOINT_DIR).is_dir().then_some(dir)
}

/// StartContainer of a container created from a checkpoint archive: the unit's ExecStart is
/// `restore-in` (init/src/restore.rs), which ends in `criu restore --restore-detached`; the unit
/// is `Type=forking` with CRIU's PID file, so systemd supervises the restored tree.
pub(crate) fn restore_properties(
    properties: &mut Vec<(&'static str, zbus::zvariant::Value<'static>)>,
    container_dir: &Path,
    restore: &Path,
) -> Result<(), Error> {
    use zbus::zvariant::Value;
    let exe = crate::sealed_exe::path()?.to_string_lossy().into_owned();
    let criu = std::fs::read_to_string(restore.join("criu")).unwrap_or_else(|_| "criu".into());
    let pid_file = restore.join("pid");
    let _ = std::fs::remove_file(&pid_file);
    let args = vec![
        exe.clone(),
        init::restore::SUBCOMMAND.to_string(),
        container_dir.join("init.json").to_string_lossy().into_owned(),
        restore.to_string_lossy().into_owned(),
        criu,
    ];
    properties.retain(|(key, _)| !matches!(*key, "Type" | "NotifyAccess" | "ExecStart"));
    properties.push(("Type", Value::from("forking")));
    properties.push(("PIDFile", Value::from(pid_file.to_string_lossy().into_owned())));
    properties.push(("ExecStart", Value::from(vec![(exe, args, false)])));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_mounts_are_external_and_the_pod_netns_too() {
        let oci: oci_spec::runtime::Spec = serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind", "ro"]},
            ]
        }))
        .unwrap();
        let binds = bind_destinations(&oci);
        assert_eq!(binds, ["/dev/shm", "/data"]);
        let args = dump_args(42, Path::new("/w/checkpoint"), Path::new("/w"), "4026532314", &binds);
        let joined = args.join(" ");
        assert!(joined.starts_with("dump --tree 42 --images-dir /w/checkpoint --work-dir /w"), "{joined}");
        assert!(joined.contains("--leave-running"));
        assert!(joined.contains("--external net[4026532314]:extRootNetNS"));
        assert!(joined.contains("--external mnt[/dev/shm]:/dev/shm --external mnt[/data]:/data"));
    }

    #[test]
    fn the_rootfs_diff_of_files_written_meanwhile_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(&upper).unwrap();
        let names: Vec<PathBuf> = (0..20).map(|i| upper.join(format!("f{i}"))).collect();
        names.iter().for_each(|name| std::fs::write(name, "0").unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The container, left running by CRIU, rewrites its files with ever different lengths.
        let writer = {
            let (names, stop) = (names.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for name in &names {
                        std::fs::write(name, vec![b'x'; 1 + (round * 7919) % 3000]).unwrap();
                        round += 1;
                    }
                }
            })
        };
        for round in 0..30 {
            let target = dir.path().join("diff.tar");
            write_rootfs_diff(&upper, &target).unwrap();
            let mut archive = tar::Archive::new(std::fs::File::open(&target).unwrap());
            let entries = archive.entries().unwrap().map(|e| e.map(|_| ())).collect::<Result<Vec<()>, _>>();
            assert_eq!(entries.map(|e| e.len()).map_err(|e| format!("round {round}: {e}")), Ok(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn the_rootfs_diff_leaves_whiteouts_out_and_lists_them_as_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(upper.join("count"), "7\n").unwrap();
        std::fs::write(upper.join("etc/motd"), "hi").unwrap();
        // A whiteout needs CAP_MKNOD; without it (an unprivileged run) only the files are checked.
        let whiteout = nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .is_ok();
        let target = dir.path().join("diff.tar");
        let deleted = write_rootfs_diff(&upper, &target).unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&target).unwrap());
        let mut names: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["count", "etc", "etc/motd"]);
        if whiteout {
            assert_eq!(deleted, ["/etc/gone"]);
        } else {
            assert!(deleted.is_empty());
        }
    }

    #[test]
    fn config_dump_has_checkpointctl_field_names() {
        let spec = crate::ContainerSpec {
            name: "counter".into(),
            image: crate::ContainerImage { name: "reg/busybox:1".into(), id: "sha256:1".into(), ..Default::default() },
            ..Default::default()
        };
        let record = Container {
            id: "abc".into(),
            pod_id: "p".into(),
            spec,
            rootfs: crate::RootfsLayers { lowerdirs: vec![], upperdir: "/u".into(), workdir: "/w".into() },
            state: ContainerState::Running,
            created_at: 1_700_000_000_000_000_000,
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            unit: "cri-abc.service".into(),
            slice: "s.slice".into(),
            user: None,
        };
        let config = config_dump(&record, 1_700_000_001_000_000_000);
        assert_eq!(config["id"], "abc");
        assert_eq!(config["name"], "counter");
        assert_eq!(config["rootfsImageName"], "reg/busybox:1");
        assert_eq!(config["createdTime"], "2023-11-14T22:13:20.000000000Z");
        assert_eq!(config["checkpointedTime"], "2023-11-14T22:13:21.000000000Z");
    }
}
