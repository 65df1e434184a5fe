//! Measured starts (`[measurements]`): every StartContainer appends one record to an append-only,
//! hash-chained log before the container's unit starts, sends it to the journal, and with a TPM
//! extends its digest into a PCR. `cri-systemd measurements verify` replays the log.
//!
//! **Where and when.** The runtime asks its start gate ([`runtime::StartGate`]) once the container
//! can start (Created, its pod Ready, a shared PID namespace's init running) and before anything
//! of the start is made; the gate appends, fsyncs, extends, and only then does the runtime start
//! the unit, whose entrypoint runs after init's set-up. A gate that cannot record (log not
//! writable, TPM unreachable with `tpm = true`) refuses the start: FailedPrecondition, the
//! container stays Created, nothing runs unmeasured.
//!
//! **What a record means: "intended".** Its event is `container-start-intended`: the daemon was
//! about to start this container with this image and this spec. If the daemon is killed between
//! the record and the start, the record stays and the log still verifies; the container is then
//! Created, and the kubelet's retry starts it (a second record, the same container id). A verifier
//! can conclude: every container that ran was recorded first, with these digests; not every
//! record is a container that ran (the unit's start may fail, or never happen). The journal and
//! the container's status say what happened after.
//!
//! **Exec is not measured.** ExecSync and Exec run a command in a container already measured (its
//! image, mounts and security settings); probes exec every few seconds, which would flood the log
//! and the PCR. What ran by exec is the kubelet's audit log's to say.
//!
//! **The record** (`log::Record`): time, pod and container ids and names, image name and repo
//! digest, manifest digest, config digest (the image id), the chain ids of the layers mounted,
//! the digest of the effective spec ([`spec_digest`]: from `init.json`, what init applies), and
//! the previous record's digest. The manifest digest is the repo digest's; the layers are those
//! of the container's record (what is mounted), named by their directories in the image store
//! (`layers/<alg>/<hex>` is the chain id).
//!
//! **The journal.** Each record is also sent with MESSAGE_ID [`MESSAGE_ID`], so
//! `journalctl MESSAGE_ID=0b424bd67e764aee981de9464b4641af` lists container starts. The daemon's
//! own logs go to stderr, which journald reads as a stream: a stream cannot carry fields, so the
//! record goes over journald's native socket with `tracing-journald` (tokio-rs/tracing's own
//! journald layer, already the tracing ecosystem the daemon logs with), through a dispatcher of
//! its own so that nothing else is sent twice. The journal is a copy: the log file is the record.
//!
//! **The TPM** ([`tpm`]): PCR 23 of the SHA-256 bank by default. systemd measures into PCRs 5,
//! 11, 12, 13 and 15 (docs/TPM2_PCR_MEASUREMENTS.md), IMA into 10, shim into 14, firmware and boot
//! loaders into 0-9; the UAPI "Linux TPM PCR Registry" lists 16 as debug and 23 as "application
//! support". 23 is resettable from locality 0: whoever can reach the TPM (root) can reset and
//! replay it, so the PCR proves the log against someone who can edit the file but not use the
//! TPM, not against root (SECURITY.md). After a record is fsync'd its digest is extended; a crash
//! between the two is repaired at the next start (the PCR still holds the value before the last
//! record: the extend is redone). When the daemon finds the PCR at another value than the log
//! expects (a reboot resets it; someone else extended it), the next record carries `pcr_base`,
//! the value the replay continues from, and `verify` lists such records.

pub mod log;
pub mod tpm;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use self::log::{LogWriter, Record};
use runtime::{StartGate, StartingContainer};
use tpm::Pcr;
use tracing::{info, warn};

use crate::config::MeasurementsConfig;

/// The journal MESSAGE_ID of a measured container start (generated once for this purpose).
pub const MESSAGE_ID: &str = "0b424bd67e764aee981de9464b4641af";

/// The debug builds' failpoints, for the e2e test of what a crash leaves: with this environment
/// variable set to [`FAILPOINT_AFTER_RECORD`] the daemon kills itself (SIGKILL) after a record is
/// written, extended and journaled, before the unit starts; set to [`FAILPOINT_BEFORE_EXTEND`],
/// after the record is written and before its extend.
pub const FAILPOINT_ENV: &str = "CRI_SYSTEMD_FAILPOINT";
pub const FAILPOINT_AFTER_RECORD: &str = "measurement-recorded";
pub const FAILPOINT_BEFORE_EXTEND: &str = "measurement-written";

/// SIGKILL when the failpoint `name` is set (debug builds only).
fn failpoint(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var(FAILPOINT_ENV).as_deref() == Ok(name) {
        warn!("failpoint {name}: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Why a measurement failed (the start is refused).
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Tpm(#[from] tpm::TpmError),
    #[error("cannot read the init spec {path}: {message}")]
    InitSpec { path: PathBuf, message: String },
}

/// The start gate of a daemon with `[measurements] enabled`.
#[derive(Debug)]
pub struct Measurer {
    state: Mutex<State>,
    pcr: Option<Pcr>,
    journal: Option<tracing::Dispatch>,
}

#[derive(Debug)]
struct State {
    log: LogWriter,
    /// The PCR has been compared with the log since the daemon started (or since an extend failed).
    reconciled: bool,
    /// The PCR's value the next record's replay starts from, when not the last record's.
    pcr_base: Option<[u8; 32]>,
}

impl Measurer {
    /// Opens the log (setting a torn one aside), and with a TPM checks that it answers.
    pub fn open(config: &MeasurementsConfig, state_root: &Path) -> Result<Measurer, MeasureError> {
        let log = LogWriter::open(&config.log_path(state_root))?;
        let pcr = if config.tpm { Some(Pcr::new(&config.tcti, config.pcr)?) } else { None };
        let journal = match tracing_journald::layer() {
            Ok(layer) => {
                use tracing_subscriber::layer::SubscriberExt;
                let layer = layer.with_field_prefix(None).with_syslog_identifier("cri-systemd".into());
                Some(tracing::Dispatch::new(tracing_subscriber::registry().with(layer)))
            }
            Err(e) => {
                warn!("measured starts: no journal socket ({e}): records go to the log file only");
                None
            }
        };
        let measurer = Measurer { state: Mutex::new(State { log, reconciled: false, pcr_base: None }), pcr, journal };
        if let Some(pcr) = &measurer.pcr {
            let mut state = measurer.state.lock().expect("measurement lock");
            // Not fatal: the TPM may come later (swtpm started after the daemon); starts wait for it.
            if let Err(e) = reconcile(&mut state, pcr) {
                warn!("measured starts: {e}; container starts are refused until the TPM answers");
            }
        }
        info!(
            log = %config.log_path(state_root).display(),
            tpm = config.tpm,
            pcr = config.pcr,
            "measured starts: every container start is recorded before it runs"
        );
        Ok(measurer)
    }

    /// Records one start. Returns the record as appended.
    pub fn measure(&self, starting: &StartingContainer) -> Result<log::AppendedRecord, MeasureError> {
        let record = record_of(starting)?;
        let mut state = self.state.lock().expect("measurement lock");
        let mut record = record;
        if let Some(pcr) = &self.pcr {
            if !state.reconciled {
                reconcile(&mut state, pcr)?;
            }
            record.pcr = Some(pcr.index());
        }
        let base = state.pcr_base;
        let appended = state.log.append(record, base)?;
        if let Some(pcr) = &self.pcr {
            state.pcr_base = None;
            failpoint(FAILPOINT_BEFORE_EXTEND);
            if let Err(e) = pcr.extend(&appended.digest) {
                // The record stays ("intended"); the next start compares the PCR again and redoes
                // this extend if the TPM never saw it.
                state.reconciled = false;
                return Err(e.into());
            }
        }
        drop(state);
        self.journal(&appended);
        failpoint(FAILPOINT_AFTER_RECORD);
        Ok(appended)
    }

    fn journal(&self, appended: &log::AppendedRecord) {
        let Some(dispatch) = &self.journal else { return };
        let r = &appended.record;
        let layers = r.layer_chain_ids.join(" ");
        let digest = log::digest_name(&appended.digest);
        tracing::dispatcher::with_default(dispatch, || {
            tracing::info!(
                message_id = MESSAGE_ID,
                record_seq = r.seq,
                record_digest = %digest,
                record_prev = %r.prev,
                pcr_after = %appended.pcr_after.map(hex::encode).unwrap_or_default(),
                pod_id = %r.pod_id,
                pod_namespace = %r.pod_namespace,
                pod_name = %r.pod_name,
                container_id = %r.container_id,
                container_name = %r.container_name,
                image = %r.image,
                image_ref = %r.image_ref,
                manifest_digest = %r.manifest_digest.as_deref().unwrap_or(""),
                config_digest = %r.config_digest,
                layer_chain_ids = %layers,
                spec_digest = %r.spec_digest,
                "container start intended: {}/{} {} image {} spec {}",
                r.pod_namespace,
                r.pod_name,
                r.container_name,
                r.image,
                r.spec_digest,
            );
        });
    }
}

impl StartGate for Measurer {
    fn before_start(&self, starting: &StartingContainer) -> Result<(), String> {
        self.measure(starting).map(drop).map_err(|e| format!("measured start: {e}"))
    }
}

/// Compares the PCR with the log: equal to the last record's value (nothing to do), equal to the
/// value before it (the daemon died between the record and its extend: extend now), else the next
/// record starts a new base from what the PCR holds.
fn reconcile(state: &mut State, pcr: &Pcr) -> Result<(), tpm::TpmError> {
    let now = pcr.read()?;
    let tail = state.log.tail().cloned().filter(|tail| tail.pcr == Some(pcr.index()));
    match tail {
        Some(tail) if tail.pcr_after == Some(now) => state.pcr_base = None,
        Some(tail) if tail.pcr_before == Some(now) => {
            pcr.extend(&tail.digest)?;
            info!(
                seq = tail.seq,
                "measured starts: extended record {} into the PCR (the daemon stopped before)", tail.seq
            );
            state.pcr_base = None;
        }
        Some(tail) => {
            warn!(
                pcr = pcr.index(),
                value = %hex::encode(now),
                expected = %tail.pcr_after.map(hex::encode).unwrap_or_default(),
                "measured starts: the PCR is not at the value the log expects (a reboot, or other extends); the next \
                 record starts the replay from its value"
            );
            state.pcr_base = Some(now);
        }
        None => state.pcr_base = Some(now),
    }
    state.reconciled = true;
    Ok(())
}

/// The record of a container about to start (its `seq` and `prev` are the log's to fill in).
fn record_of(starting: &StartingContainer) -> Result<Record, MeasureError> {
    let c = &starting.container;
    let pod = &starting.pod;
    let init = init::InitSpec::load(&starting.init_spec)
        .map_err(|e| MeasureError::InitSpec { path: starting.init_spec.clone(), message: e.to_string() })?;
    let time_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let manifest_digest = c.spec.image.repo_digest.split_once('@').map(|(_, digest)| digest.to_string());
    // Top first in the record of the container (overlayfs order); bottom first here, as in a manifest.
    let layer_chain_ids = c.rootfs.lowerdirs.iter().rev().map(|dir| chain_id_of(dir)).collect();
    Ok(Record {
        event: log::EVENT_START_INTENDED.into(),
        time_unix_ns,
        pod_id: pod.id.clone(),
        pod_uid: pod.spec.uid.clone(),
        pod_namespace: pod.spec.namespace.clone(),
        pod_name: pod.spec.name.clone(),
        container_id: c.id.clone(),
        container_name: c.spec.name.clone(),
        container_attempt: c.spec.attempt,
        image: c.spec.image.name.clone(),
        image_ref: c.spec.image.repo_digest.clone(),
        manifest_digest,
        config_digest: c.spec.image.id.clone(),
        layer_chain_ids,
        spec_digest: spec_digest(&init),
        ..Default::default()
    })
}

/// `layers/sha256/<hex>/diff` -> `sha256:<hex>`; any other path as it is.
fn chain_id_of(dir: &Path) -> String {
    let parts: Vec<_> = dir.components().rev().take(3).map(|c| c.as_os_str().to_string_lossy()).collect();
    match parts.as_slice() {
        [diff, hex, alg] if diff == "diff" && hex.len() == 64 => format!("{alg}:{hex}"),
        _ => dir.display().to_string(),
    }
}

/// `sha256:<hex>` of what init applies of the spec: the command, the environment's names (never
/// its values: they hold secrets), the working directory, the mounts, the user, the capabilities,
/// no_new_privileges, the seccomp filter, the AppArmor profile, a read-only root, masked and
/// read-only paths, the devices. serde_json writes maps with sorted keys (no `preserve_order`), so
/// the same spec always gives the same bytes.
pub fn spec_digest(init: &init::InitSpec) -> String {
    let spec = &init.oci;
    let process = spec.process().as_ref();
    let linux = spec.linux().as_ref();
    let env_names: Vec<&str> = process
        .and_then(|p| p.env().as_ref())
        .map(|env| env.iter().map(|e| e.split_once('=').map_or(e.as_str(), |(name, _)| name)).collect())
        .unwrap_or_default();
    let effective = serde_json::json!({
        "args": process.and_then(|p| p.args().clone()),
        "env_names": env_names,
        "cwd": process.map(|p| p.cwd().clone()),
        "user": process.map(|p| p.user().clone()),
        "capabilities": process.and_then(|p| p.capabilities().clone()),
        "no_new_privileges": process.and_then(|p| p.no_new_privileges()),
        "apparmor_profile": process.and_then(|p| p.apparmor_profile().clone()),
        "mounts": spec.mounts().clone(),
        "root_readonly": spec.root().as_ref().and_then(|r| r.readonly()),
        "seccomp": linux.and_then(|l| l.seccomp().clone()),
        "masked_paths": linux.and_then(|l| l.masked_paths().clone()),
        "readonly_paths": linux.and_then(|l| l.readonly_paths().clone()),
        "devices": linux.and_then(|l| l.devices().clone()),
        "image_volumes": init.image_volumes.iter().map(|v| (&v.destination, &v.overlay.lowerdirs)).collect::<Vec<_>>(),
    });
    log::digest_name(&log::sha256(&serde_json::to_vec(&effective).expect("a spec serialises")))
}

/// `cri-systemd measurements verify`: replays the log; with a TCTI, compares the PCR. Prints one
/// line per problem (with its record's position) and a summary; Ok(true) when all is well.
pub fn verify_command(log_path: &Path, pcr: Option<Pcr>) -> Result<bool, String> {
    let text = std::fs::read(log_path).map_err(|e| format!("cannot read {}: {e}", log_path.display()))?;
    let replay = log::verify(&text);
    for problem in &replay.problems {
        println!("record {}: {}", problem.position, problem.message);
    }
    if let Some(previous) = &replay.previous_log {
        println!("note: the log continues {previous} (set aside after a crash tore its last line): verify it too");
    }
    for position in &replay.rebases {
        println!(
            "note: record {position} starts the PCR replay from a new value (a reboot, or extends by someone else \
             since the record before)"
        );
    }
    let mut ok = replay.problems.is_empty();
    let mut pcr_line = String::new();
    if let Some(pcr) = pcr {
        let now = pcr.read().map_err(|e| e.to_string())?;
        match replay.pcr {
            Some((index, expected)) if index == pcr.index() && expected == now => {
                pcr_line = format!(", PCR {index} equals the replay ({})", hex::encode(now));
            }
            Some((index, expected)) if index == pcr.index() => {
                ok = false;
                println!(
                    "pcr {index}: the TPM holds {} but the replay of the log gives {}: the TPM saw extends the log does \
                     not hold, or the log lost or changed records at its end",
                    hex::encode(now),
                    hex::encode(expected)
                );
            }
            Some((index, _)) => {
                ok = false;
                println!("pcr: the log extends PCR {index}, not PCR {}", pcr.index());
            }
            None if replay.records > 0 => {
                ok = false;
                println!("pcr {}: the log has no PCR values (it was written without a TPM)", pcr.index());
            }
            None => {}
        }
    }
    if ok {
        println!("ok: {} records, chain intact{pcr_line}", replay.records);
    } else {
        println!("FAILED: {} of {} records does not verify", log_path.display(), replay.records);
    }
    Ok(ok)
}
