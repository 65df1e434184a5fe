//! The daemon's configuration: a TOML file whose every key has a default, so no file is needed.
//! An unknown key or a bad value is a startup error naming the key and the file.
//!
//! Drop-ins: the `*.toml` files of a directory (`--config-dir`, by default `config.d` beside the
//! config file: /etc/cri-systemd/config.d) are merged over the config file in lexical order of
//! their names before the result is parsed into [`Config`]. Tables merge key by key and a later
//! file's value replaces an earlier one; arrays are replaced whole. That is CRI-O's rule for
//! /etc/crio/crio.conf.d (each file decoded over the config so far, `UpdateFromPath`), not
//! containerd's `imports` (mergo, which appends arrays): replacing is the only way a drop-in can
//! remove a default entry, e.g. one of `cni.plugin_dirs`. A missing directory is no error; files
//! not named `*.toml` (editor and dpkg leftovers) are skipped. Each file is first checked alone
//! (syntax, unknown keys, types: the error names the file, the key and the line); checks across
//! keys run on the merged config and name the last file that set the key at fault. The files read
//! are kept in [`Config::sources`] (`cri-systemd check` and Status(verbose) show them). The merge
//! is a few lines over `toml::Table`; no crate does this for TOML (figment would, but it brings
//! its own error and provider model for one function).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the config file is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cri-systemd/config.toml";

/// The effective configuration of the daemon (`cri-systemd config` prints it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket serving both CRI services (created with mode 0660).
    pub socket: PathBuf,
    /// Persistent state: images, layers, pod and container records.
    pub state_root: PathBuf,
    /// Volatile state: namespace pins, per-pod files; lost on reboot, as the pods are.
    pub run_root: PathBuf,
    /// One of error, warn, info, debug, trace.
    pub log_level: LogLevel,
    pub systemd: SystemdConfig,
    pub cni: runtime::CniConfig,
    /// The image store (the `[images]` table).
    pub images: imagestore::StoreConfig,
    /// ExecSync (the `[exec]` table).
    pub exec: ExecConfig,
    /// The streaming server of Exec, Attach and PortForward (the `[streaming]` table).
    pub streaming: StreamingConfig,
    /// The pool of host id ranges for pods in user namespaces (the `[userns]` table).
    pub userns: runtime::UsernsConfig,
    /// Limits of every container (the `[containers]` table).
    pub containers: ContainersConfig,
    /// Runtime handlers besides the default one (`""`), the `[runtimes.<name>]` tables: what a
    /// RuntimeClass's `handler` names. RunPodSandbox with a handler not listed here is refused.
    pub runtimes: BTreeMap<String, RuntimeHandlerConfig>,
    /// Container Device Interface specs (the `[cdi]` table).
    pub cdi: CdiConfig,
    /// CheckpointContainer and restores (the `[checkpoint]` table).
    pub checkpoint: CheckpointConfig,
    /// The files this config was read from, in merge order: the config file (if it exists), then
    /// the drop-ins. Not a key of the file.
    #[serde(skip)]
    pub sources: Vec<PathBuf>,
    /// The Prometheus metrics endpoint (the `[metrics]` table); off unless `address` is set.
    pub metrics: MetricsConfig,
    /// OpenTelemetry traces of CRI calls (the `[tracing]` table; off by default).
    pub tracing: crate::otel::TracingConfig,
    /// Measured starts (the `[measurements]` table): off by default.
    pub measurements: MeasurementsConfig,
}

/// A runtime handler (a `[runtimes.<name>]` table): what its pods get besides what the default
/// handler gives. Every key defaults to the default handler's behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandlerConfig {
    /// Every pod of this handler gets a user namespace of its own (a range from the `[userns]`
    /// pool) even when the kubelet asks for none (hostUsers unset or true). Such a pod cannot
    /// have the node's network, PID or IPC namespace: RunPodSandbox refuses it.
    pub user_namespace: bool,
    /// Containers of this handler's pods that would run without a seccomp filter (profile
    /// Unconfined, or none given: the kubelet sends Unconfined unless SeccompDefault is on) get
    /// RuntimeDefault instead. Localhost profiles are kept; privileged containers stay
    /// unconfined, as with every handler.
    pub seccomp_runtime_default: bool,
}

/// Where CDI specs are read (the `[cdi]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdiConfig {
    /// Directories of CDI spec files (`*.json`, `*.yaml`), read when a container asks for CDI
    /// devices; a device in a later directory replaces one of the same name in an earlier one
    /// (the CDI library's priority: /var/run/cdi, generated, over /etc/cdi, static).
    pub spec_dirs: Vec<PathBuf>,
}

impl Default for CdiConfig {
    fn default() -> Self {
        Self { spec_dirs: vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")] }
    }
}

/// CheckpointContainer and restores with CRIU (the `[checkpoint]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// The CRIU binary; a bare name is looked up on PATH. It must pass `criu check` on the node's
    /// kernel (Debian 12's 3.17 does not on >= 6.13: scripts/setup-criu builds 4.1.1).
    pub criu_path: PathBuf,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { criu_path: PathBuf::from("criu") }
    }
}

/// Limits of every container (the `[containers]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    /// The unit's TasksMax (pids.max): a fork bomb stops there, not at the node's pid_max
    /// (podman's default). 0: no limit of its own. The kubelet's pod pids limit (podPidsLimit,
    /// which it writes on the pod's cgroup) still bounds all of a pod's containers together.
    pub tasks_max: u64,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        Self { tasks_max: 4096 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/cri-systemd/cri-systemd.sock"),
            state_root: PathBuf::from("/var/lib/cri-systemd"),
            run_root: PathBuf::from("/run/cri-systemd"),
            log_level: LogLevel::Info,
            systemd: SystemdConfig::default(),
            cni: runtime::CniConfig::default(),
            images: imagestore::StoreConfig::default(),
            exec: ExecConfig::default(),
            streaming: StreamingConfig::default(),
            userns: runtime::UsernsConfig::default(),
            containers: ContainersConfig::default(),
            runtimes: BTreeMap::new(),
            cdi: CdiConfig::default(),
            checkpoint: CheckpointConfig::default(),
            sources: Vec::new(),
            metrics: MetricsConfig::default(),
            tracing: crate::otel::TracingConfig::default(),
            measurements: MeasurementsConfig::default(),
        }
    }
}

/// The Prometheus metrics endpoint (the `[metrics]` table), as containerd's `[metrics] address`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `IP:port` to serve `/metrics` on over plain HTTP (e.g. `127.0.0.1:1338`); unset: no
    /// endpoint. Anyone who reaches it sees pod counts and call rates: keep it on loopback or a
    /// network only Prometheus reaches.
    pub address: Option<std::net::SocketAddr>,
}

/// ExecSync settings (the `[exec]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecConfig {
    /// Largest ExecSync answer: stdout and stderr together, plus a few bytes of framing; the
    /// rest of the output is read and discarded (CVE-2022-1708). The default is the kubelet's
    /// gRPC receive limit (16 MiB, `maxMsgSize` of k8s.io/cri-client).
    pub sync_max_output_bytes: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self { sync_max_output_bytes: 16 << 20 }
    }
}

/// The streaming server (the `[streaming]` table): Exec, Attach and PortForward answer with a
/// URL on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// IP address to listen on. The kubelet reaches it (it proxies clients' streams).
    pub address: std::net::IpAddr,
    /// TCP port; 0 picks a free one at start (as containerd and CRI-O do).
    pub port: u16,
    /// PEM certificate (chain) and key: serve HTTPS. Both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// How long a URL handed out by Exec, Attach or PortForward stays usable (once).
    pub token_ttl_secs: u64,
    /// How long the client may take to open its streams after the upgrade.
    pub stream_creation_timeout_secs: u64,
    /// Sessions in which nothing moves for this long are closed (0: never).
    pub idle_timeout_secs: u64,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            token_ttl_secs: 60,
            stream_creation_timeout_secs: 30,
            idle_timeout_secs: 4 * 3600,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// How the daemon reaches systemd (the `[systemd]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemdConfig {
    /// D-Bus address of the system bus. systemd's private socket is not supported: zbus rejects
    /// the sender name systemd uses on it (zbus issue #1497).
    pub bus_address: String,
}

impl Default for SystemdConfig {
    fn default() -> Self {
        Self { bus_address: "unix:path=/run/dbus/system_bus_socket".into() }
    }
}

/// Measured starts (the `[measurements]` table; `crate::measurements`): every StartContainer
/// appends a hash-chained record to `log` before the container's unit starts, and, with `tpm`,
/// extends the record's digest into PCR `pcr` of the TPM that `tcti` reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeasurementsConfig {
    /// Record every container start (off by default).
    pub enabled: bool,
    /// The log file; default `<state_root>/measurements/starts.log`.
    pub log: Option<PathBuf>,
    /// Extend each record into a TPM PCR. A start is refused while the TPM cannot be reached.
    pub tpm: bool,
    /// How to reach the TPM, as tpm2-tss names a TCTI: `device:/dev/tpmrm0` (the kernel's resource
    /// manager), `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`.
    pub tcti: String,
    /// The PCR (SHA-256 bank) extended: 23, "application support" in the UAPI Linux TPM PCR
    /// Registry; 0-15 belong to firmware, boot loaders, IMA (10) and systemd (11-15), 16 is debug.
    pub pcr: u8,
}

impl Default for MeasurementsConfig {
    fn default() -> Self {
        Self { enabled: false, log: None, tpm: false, tcti: "device:/dev/tpmrm0".into(), pcr: 23 }
    }
}

impl MeasurementsConfig {
    /// The log file of this config under `state_root`.
    pub fn log_path(&self, state_root: &Path) -> PathBuf {
        self.log.clone().unwrap_or_else(|| state_root.join("measurements").join("starts.log"))
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(log) = &self.log
            && !log.is_absolute()
        {
            return Err(("measurements.log", format!("{} is not an absolute path", log.display())));
        }
        if self.pcr > 23 {
            return Err(("measurements.pcr", format!("{} is not a PCR of a PC-client TPM (0-23)", self.pcr)));
        }
        if self.pcr < 8 {
            return Err(("measurements.pcr", format!("PCR {} belongs to the firmware (0-7); use 23", self.pcr)));
        }
        crate::measurements::tpm::parse_tcti(&self.tcti).map_err(|e| ("measurements.tcti", e.to_string()))?;
        Ok(())
    }
}

/// A config that cannot be used, with the file and, where known, the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("config file {file}: key `{key}`: {message}")]
    Key { file: String, key: String, message: String },
    #[error("config file {file}: {message}")]
    Syntax { file: String, message: String },
}

impl Config {
    /// Loads the config from `path`, or the defaults when `path` is the default path and no file
    /// is there (an explicitly named file must exist), then merges the drop-ins of `drop_in_dir`
    /// (by default `config.d` beside the config file) over it.
    pub fn load(path: Option<&Path>, drop_in_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(path) => (path, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        let default_dir;
        let drop_in_dir = match drop_in_dir {
            Some(dir) => dir,
            None => {
                default_dir = path.parent().unwrap_or(Path::new("/")).join(DROP_IN_DIR_NAME);
                &default_dir
            }
        };
        let mut files = Vec::new();
        match std::fs::read_to_string(path) {
            Ok(text) => files.push((path.to_path_buf(), text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(source) => return Err(ConfigError::Read { file: path.to_path_buf(), source }),
        }
        for file in drop_in_files(drop_in_dir)? {
            let text =
                std::fs::read_to_string(&file).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
            files.push((file, text));
        }
        let named: Vec<(String, &str)> = files.iter().map(|(f, t)| (f.display().to_string(), t.as_str())).collect();
        let mut config = Config::merge(&named, &path.display().to_string())?;
        config.sources = files.into_iter().map(|(file, _)| file).collect();
        Ok(config)
    }

    /// Parses and validates TOML text; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config = Config::deserialize_file(text, file)?;
        config.validate(file)?;
        Ok(config)
    }

    /// Merges `files` (name, TOML text), in order, over the defaults and validates the result.
    /// `fallback` names the config in errors no file is to blame for (a bad default).
    pub fn merge(files: &[(String, &str)], fallback: &str) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        // Which file last set each key (dotted path, leaves only): the file an error names.
        let mut set_by: BTreeMap<String, usize> = BTreeMap::new();
        for (index, (file, text)) in files.iter().enumerate() {
            // Alone first, for errors with the file's own line numbers.
            Config::deserialize_file(text, file)?;
            let table: toml::Table = toml::from_str(text)
                .map_err(|e| ConfigError::Syntax { file: file.clone(), message: describe(&e, text) })?;
            merge_table(&mut merged, table, "", index, &mut set_by);
        }
        let blame = |key: &str| -> String {
            let key = key.split('[').next().unwrap_or(key);
            let last = set_by
                .iter()
                .filter(|(path, _)| {
                    *path == key || path.starts_with(&format!("{key}.")) || key.starts_with(&format!("{path}."))
                })
                .map(|(_, index)| *index)
                .max();
            match last {
                Some(index) => files[index].0.clone(),
                None => files.last().map(|(file, _)| file.clone()).unwrap_or_else(|| fallback.to_string()),
            }
        };
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Key { file: blame(&key), key, message: e.inner().message().trim().to_string() }
        })?;
        config.validate("").map_err(|e| match e {
            ConfigError::Key { key, message, .. } => ConfigError::Key { file: blame(&key), key, message },
            other => other,
        })?;
        Ok(config)
    }

    /// One file's TOML into a config, without the checks across keys; `file` names it in errors.
    fn deserialize_file(text: &str, file: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::Syntax { file: file.into(), message: describe(&e, text) })?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = describe(e.inner(), text);
            if key.is_empty() || key == "." {
                ConfigError::Syntax { file: file.into(), message }
            } else {
                ConfigError::Key { file: file.into(), key, message }
            }
        })
    }

    /// Checks what serde cannot: paths must be absolute, the socket path must fit a sockaddr_un.
    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Key { file: file.into(), key: key.into(), message };
        let absolute = [
            ("socket", &self.socket),
            ("state_root", &self.state_root),
            ("run_root", &self.run_root),
            ("cni.conf_dir", &self.cni.conf_dir),
        ];
        for (key, path) in absolute {
            if !path.is_absolute() {
                return Err(bad(key, format!("{} is not an absolute path", path.display())));
            }
        }
        for (index, dir) in self.cni.plugin_dirs.iter().enumerate() {
            if !dir.is_absolute() {
                return Err(bad(
                    &format!("cni.plugin_dirs[{index}]"),
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if self.cni.plugin_timeout_secs == 0 {
            return Err(bad("cni.plugin_timeout_secs", "must be more than 0".into()));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return Err(bad("socket", "longer than the 107 bytes a unix socket path may have".into()));
        }
        self.images.validate().map_err(|e| bad("images", e.to_string()))?;
        if self.exec.sync_max_output_bytes == 0 {
            return Err(bad("exec.sync_max_output_bytes", "must be more than 0".into()));
        }
        if self.streaming.tls_cert_file.is_some() != self.streaming.tls_key_file.is_some() {
            return Err(bad(
                "streaming.tls_cert_file",
                "tls_cert_file and tls_key_file go together: set both or neither".into(),
            ));
        }
        if self.streaming.token_ttl_secs == 0 {
            return Err(bad("streaming.token_ttl_secs", "must be more than 0".into()));
        }
        if self.streaming.stream_creation_timeout_secs == 0 {
            return Err(bad("streaming.stream_creation_timeout_secs", "must be more than 0".into()));
        }
        // Ranges of ids are 64K-aligned blocks (systemd's UIDS-GIDS.md): the layers' range must be
        // one, or it could overlap a pod's range without either being told.
        if !self.images.layer_uid_shift.is_multiple_of(65536) {
            return Err(bad(
                "images.layer_uid_shift",
                format!("{} is not a multiple of 65536 (e.g. 2147352576, 0x7FFE0000)", self.images.layer_uid_shift),
            ));
        }
        self.userns.validate(self.images.layer_uid_shift).map_err(|(key, message)| bad(key, message))?;
        for name in self.runtimes.keys() {
            if !is_dns_label(name) {
                return Err(bad(
                    &format!("runtimes.{name}"),
                    format!(
                        "{name:?} is not a runtime handler name: a RuntimeClass handler is a lowercase RFC 1123 \
                         label (a-z, 0-9 and '-', at most 63 characters); the default handler \"\" needs no table"
                    ),
                ));
            }
        }
        for (index, dir) in self.cdi.spec_dirs.iter().enumerate() {
            if !dir.is_absolute() {
                return Err(bad(
                    &format!("cdi.spec_dirs[{index}]"),
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if self.metrics.address.is_some_and(|address| address.port() == 0) {
            return Err(bad("metrics.address", "port 0 is not a port Prometheus can scrape: name one".into()));
        }
        if !self.systemd.bus_address.contains(':') {
            return Err(bad(
                "systemd.bus_address",
                format!(
                    "{:?} is not a D-Bus address (e.g. unix:path=/run/dbus/system_bus_socket)",
                    self.systemd.bus_address
                ),
            ));
        }
        self.tracing.validate().map_err(|(key, message)| bad(key, message))?;
        self.measurements.validate().map_err(|(key, message)| bad(key, message))?;
        Ok(())
    }

    /// The config as TOML, as `cri-systemd config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config always serializes")
    }
}

/// The drop-in directory's name, beside the config file.
pub const DROP_IN_DIR_NAME: &str = "config.d";

/// The `*.toml` files of `dir` (not hidden, not directories), sorted by name; none when `dir`
/// does not exist.
fn drop_in_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { file: dir.to_path_buf(), source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read { file: dir.to_path_buf(), source })?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if name.starts_with(b".") || !name.ends_with(b".toml") {
            continue;
        }
        // Follows symlinks: a drop-in may be a link to a shared file.
        let path = entry.path();
        if path.is_dir() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Merges `from` into `into`: tables key by key, anything else (arrays too) replaced. Records in
/// `set_by` that file `file` set each leaf under `prefix`.
fn merge_table(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: usize,
    set_by: &mut BTreeMap<String, usize>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(table)) => {
                merge_table(existing, table, &path, file, set_by);
            }
            (_, value) => {
                // A table replacing a non-table (or a new one): its leaves are this file's.
                if let toml::Value::Table(table) = &value {
                    record_leaves(table, &path, file, set_by);
                }
                set_by.insert(path, file);
                into.insert(key, value);
            }
        }
    }
}

fn record_leaves(table: &toml::Table, prefix: &str, file: usize, set_by: &mut BTreeMap<String, usize>) {
    for (key, value) in table {
        let path = format!("{prefix}.{key}");
        if let toml::Value::Table(inner) = value {
            record_leaves(inner, &path, file, set_by);
        }
        set_by.insert(path, file);
    }
}

/// What the API server accepts as a RuntimeClass handler (a DNS label, RFC 1123).
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !name.is_empty()
        && name.len() <= 63
        && bytes.iter().all(inner)
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// toml's own message, with the line it points at; its multi-line source excerpt reads badly in
/// the journal.
fn describe(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", "t.toml").unwrap(), Config::default());
    }

    #[test]
    fn shipped_default_config_is_the_default() {
        let text = include_str!("../../deploy/config.toml");
        assert_eq!(Config::parse(text, "deploy/config.toml").unwrap(), Config::default());
    }

    #[test]
    fn printed_config_parses_back() {
        let config = Config::default();
        assert_eq!(Config::parse(&config.to_toml(), "printed").unwrap(), config);
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let err = Config::parse("sockt = \"/x\"\n", "/etc/c.toml").unwrap_err().to_string();
        assert!(err.contains("/etc/c.toml") && err.contains("sockt"), "{err}");
        let err = Config::parse("[systemd]\nbus = \"x\"\n", "/etc/c.toml").unwrap_err().to_string();
        assert!(err.contains("bus"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::parse("log_level = \"loud\"\n", "c").unwrap_err().to_string();
        assert!(err.contains("`log_level`") && err.contains("loud"), "{err}");
        let err = Config::parse("state_root = \"relative/dir\"\n", "c").unwrap_err().to_string();
        assert!(err.contains("`state_root`"), "{err}");
        let err = Config::parse("[cni]\nplugin_dirs = [\"/ok\", \"rel\"]\n", "c").unwrap_err().to_string();
        assert!(err.contains("`cni.plugin_dirs[1]`"), "{err}");
        let err = Config::parse("[images]\nlayer_uid_shift = 2147352577\n", "c").unwrap_err().to_string();
        assert!(err.contains("`images.layer_uid_shift`") && err.contains("65536"), "{err}");
        let err = Config::parse("[containers]\ntasks_maks = 1\n", "c").unwrap_err().to_string();
        assert!(err.contains("tasks_maks"), "{err}");
        let err = Config::parse("[cni]\nplugin_timeout_secs = 0\n", "c").unwrap_err().to_string();
        assert!(err.contains("`cni.plugin_timeout_secs`"), "{err}");
        let err = Config::parse("[systemd]\nbus_address = 3\n", "c").unwrap_err().to_string();
        assert!(err.contains("`systemd.bus_address`"), "{err}");
    }

    #[test]
    fn userns_pool_is_checked_against_the_image_layers() {
        let config = Config::parse("[userns]\npool_start = 524288\npool_ranges = 2\n", "c").unwrap();
        assert_eq!((config.userns.pool_start, config.userns.pool_ranges), (524288, 2));
        let err = Config::parse("[userns]\npool_start = 1000\n", "c").unwrap_err().to_string();
        assert!(err.contains("`userns.pool_start`"), "{err}");
        let err =
            Config::parse("[images]\nlayer_uid_shift = 655360\n[userns]\npool_start = 589824\npool_ranges = 2\n", "c")
                .unwrap_err()
                .to_string();
        assert!(err.contains("`userns.pool_ranges`") && err.contains("layer_uid_shift"), "{err}");
        let err = Config::parse("[userns]\npool_size = 2\n", "c").unwrap_err().to_string();
        assert!(err.contains("pool_size"), "{err}");
    }

    #[test]
    fn runtime_handlers_are_tables_named_as_runtime_class_handlers() {
        let config = Config::parse(
            "[runtimes.userns]\nuser_namespace = true\n[runtimes.hardened]\nseccomp_runtime_default = true\n",
            "c",
        )
        .unwrap();
        assert_eq!(config.runtimes.keys().collect::<Vec<_>>(), ["hardened", "userns"]);
        assert!(config.runtimes["userns"].user_namespace && !config.runtimes["userns"].seccomp_runtime_default);
        assert_eq!(Config::parse(&config.to_toml(), "printed").unwrap(), config);
        for bad in ["[runtimes.Upper]\n", "[runtimes.\"\"]\n", "[runtimes.-x]\n", "[runtimes.a_b]\n"] {
            let err = Config::parse(bad, "c").unwrap_err().to_string();
            assert!(err.contains("`runtimes.") && err.contains("RFC 1123"), "{bad}: {err}");
        }
        let err = Config::parse("[runtimes.x]\nuserns = true\n", "c").unwrap_err().to_string();
        assert!(err.contains("userns"), "{err}");
        let err = Config::parse("[cdi]\nspec_dirs = [\"etc/cdi\"]\n", "c").unwrap_err().to_string();
        assert!(err.contains("`cdi.spec_dirs[0]`"), "{err}");
    }

    #[test]
    fn metrics_are_off_by_default_and_a_bad_address_names_its_key() {
        assert_eq!(Config::default().metrics.address, None);
        let config = Config::parse("[metrics]\naddress = \"127.0.0.1:1338\"\n", "c").unwrap();
        assert_eq!(config.metrics.address, Some("127.0.0.1:1338".parse().unwrap()));
        assert_eq!(Config::parse(&config.to_toml(), "printed").unwrap(), config);
        for bad in ["localhost:1338", "127.0.0.1", "1338", "127.0.0.1:99999"] {
            let err =
                Config::parse(&format!("[metrics]\naddress = \"{bad}\"\n"), "/etc/c.toml").unwrap_err().to_string();
            assert!(err.contains("`metrics.address`") && err.contains("/etc/c.toml"), "{bad}: {err}");
        }
        let err = Config::parse("[metrics]\naddress = \"127.0.0.1:0\"\n", "c").unwrap_err().to_string();
        assert!(err.contains("`metrics.address`") && err.contains("port 0"), "{err}");
        let err = Config::parse("[metrics]\nenable = true\n", "c").unwrap_err().to_string();
        assert!(err.contains("enable"), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/c.toml")), None).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/c.toml"), "{err}");
    }

    fn merged(files: &[(&str, &str)]) -> Result<Config, String> {
        let files: Vec<(String, &str)> = files.iter().map(|(f, t)| (f.to_string(), *t)).collect();
        Config::merge(&files, "main.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn drop_ins_merge_tables_key_by_key_later_files_win() {
        let config = merged(&[
            ("main.toml", "log_level = \"debug\"\n[images]\nretries = 7\nmax_concurrent_downloads = 2\n"),
            ("10-a.toml", "[images]\nretries = 9\n[cni]\nplugin_dirs = [\"/a\", \"/b\"]\n"),
            ("20-b.toml", "[cni]\nplugin_dirs = [\"/c\"]\n[runtimes.userns]\nuser_namespace = true\n"),
        ])
        .unwrap();
        assert_eq!(config.log_level, LogLevel::Debug, "a key no drop-in sets stays");
        assert_eq!(config.images.retries, 9, "a later file wins");
        assert_eq!(config.images.max_concurrent_downloads, 2, "a table merges key by key");
        assert_eq!(config.cni.plugin_dirs, [PathBuf::from("/c")], "an array is replaced, not appended");
        assert!(config.runtimes["userns"].user_namespace);
        assert_eq!(config.cni.conf_dir, Config::default().cni.conf_dir, "defaults under everything");
    }

    #[test]
    fn drop_in_errors_name_the_file_key_and_line() {
        let err = merged(&[("main.toml", ""), ("/d/10-bad.toml", "\n[images]\nretriez = 1\n")]).unwrap_err();
        assert!(err.contains("/d/10-bad.toml") && err.contains("retriez") && err.contains("line 3"), "{err}");
        let err = merged(&[("main.toml", ""), ("/d/10-bad.toml", "log_level = \"x\"\n")]).unwrap_err();
        assert!(err.contains("/d/10-bad.toml") && err.contains("`log_level`"), "{err}");
        let err = merged(&[("main.toml", ""), ("/d/10-bad.toml", "[cni\n")]).unwrap_err();
        assert!(err.contains("/d/10-bad.toml") && err.contains("line 1"), "{err}");
        // A check across files names the file that set the key at fault.
        let err = merged(&[
            ("main.toml", "[images]\nlayer_uid_shift = 655360\n"),
            ("/d/10-ok.toml", "log_level = \"warn\"\n"),
            ("/d/20-pool.toml", "[userns]\npool_start = 589824\npool_ranges = 2\n"),
            ("/d/30-other.toml", "[exec]\nsync_max_output_bytes = 5\n"),
        ])
        .unwrap_err();
        assert!(err.contains("/d/20-pool.toml") && err.contains("`userns.pool_ranges`"), "{err}");
        let err = merged(&[
            ("main.toml", "[cni]\nplugin_dirs = [\"/ok\"]\n"),
            ("/d/1.toml", "[cni]\nplugin_dirs = [\"x\"]\n"),
        ])
        .unwrap_err();
        assert!(err.contains("/d/1.toml") && err.contains("`cni.plugin_dirs[0]`"), "{err}");
        // A table-wide check (`images`) names the last file that set a key of the table.
        let err = merged(&[
            ("main.toml", "[images]\nretries = 2\n"),
            ("/d/1.toml", "[images]\npinned_images = [\"Bad Name\"]\n"),
            ("/d/2.toml", "log_level = \"warn\"\n"),
        ])
        .unwrap_err();
        assert!(err.contains("/d/1.toml") && err.contains("`images`"), "{err}");
    }

    #[test]
    fn drop_in_dir_is_read_in_lexical_order_of_toml_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::write(&main, "[images]\nretries = 1\n").unwrap();
        let drop_ins = dir.path().join(DROP_IN_DIR_NAME);
        std::fs::create_dir(&drop_ins).unwrap();
        std::fs::write(drop_ins.join("20-b.toml"), "[images]\nretries = 3\n").unwrap();
        std::fs::write(drop_ins.join("10-a.toml"), "[images]\nretries = 2\n").unwrap();
        std::fs::write(drop_ins.join("30-c.toml.dpkg-old"), "garbage").unwrap();
        std::fs::write(drop_ins.join(".40-hidden.toml"), "garbage").unwrap();
        std::fs::create_dir(drop_ins.join("50-dir.toml")).unwrap();
        let config = Config::load(Some(&main), None).unwrap();
        assert_eq!(config.images.retries, 3);
        assert_eq!(config.sources, [main.clone(), drop_ins.join("10-a.toml"), drop_ins.join("20-b.toml")]);
        // Another directory, given explicitly; a missing one is no error.
        let config = Config::load(Some(&main), Some(&dir.path().join("none"))).unwrap();
        assert_eq!((config.images.retries, config.sources.len()), (1, 1));
    }

    #[test]
    fn measurements_keys_are_checked() {
        let config = Config::parse(
            "[measurements]\nenabled = true\ntpm = true\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n",
            "c",
        )
        .unwrap();
        assert!(config.measurements.enabled && config.measurements.pcr == 23);
        assert_eq!(
            config.measurements.log_path(&config.state_root),
            Path::new("/var/lib/cri-systemd/measurements/starts.log")
        );
        for (bad, key) in [
            ("[measurements]\nlog = \"rel/log\"\n", "`measurements.log`"),
            ("[measurements]\npcr = 24\n", "`measurements.pcr`"),
            ("[measurements]\npcr = 7\n", "`measurements.pcr`"),
            ("[measurements]\ntcti = \"tpm0\"\n", "`measurements.tcti`"),
            ("[measurements]\npcrs = 1\n", "pcrs"),
        ] {
            let err = Config::parse(bad, "/etc/c.toml").unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("/etc/c.toml"), "{bad}: {err}");
        }
    }
}
