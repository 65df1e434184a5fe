//! The daemon's configuration: a TOML file whose every key has a default, so no file is needed.
//! An unknown key or a bad value is a startup error naming the key and the file.

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
        }
    }
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
    /// is there. An explicitly named file must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, required) = match path {
            Some(path) => (path, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                let config = Config::default();
                config.validate(&path.display().to_string())?;
                Ok(config)
            }
            Err(source) => Err(ConfigError::Read { file: path.to_path_buf(), source }),
        }
    }

    /// Parses and validates TOML text; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::Syntax { file: file.into(), message: describe(&e, text) })?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = describe(e.inner(), text);
            if key.is_empty() || key == "." {
                ConfigError::Syntax { file: file.into(), message }
            } else {
                ConfigError::Key { file: file.into(), key, message }
            }
        })?;
        config.validate(file)?;
        Ok(config)
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
        if !self.systemd.bus_address.contains(':') {
            return Err(bad(
                "systemd.bus_address",
                format!(
                    "{:?} is not a D-Bus address (e.g. unix:path=/run/dbus/system_bus_socket)",
                    self.systemd.bus_address
                ),
            ));
        }
        Ok(())
    }

    /// The config as TOML, as `cri-systemd config` prints it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config always serializes")
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
    fn explicit_missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/c.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/c.toml"), "{err}");
    }
}
