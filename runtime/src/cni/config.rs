//! Finding and reading the node's CNI network config, the way libcni (kubelet, containerd) does:
//! the lexically first valid `.conflist`, `.conf` or `.json` file of the config dir.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The CNI spec versions whose configs and results this runtime understands. 0.1.0 and 0.2.0
/// results have another shape (ip4/ip6 objects) and are not supported.
const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// Why a network config file cannot be used (one line of NotReady's message per file).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no {0:?}")]
    Missing(&'static str),
    #[error("\"plugins\" is not a list")]
    PluginsNotAList,
    #[error("\"plugins\" is empty")]
    NoPlugins,
    #[error("a plugin is not a JSON object")]
    PluginNotAnObject,
    #[error("a plugin has no \"type\"")]
    PluginWithoutType,
    #[error("has \"plugins\": a network config list must be a .conflist file")]
    ListInSingle,
    #[error("network name {0:?} is not [a-zA-Z0-9][a-zA-Z0-9_.-]*")]
    BadName(String),
    #[error("cniVersion {version:?} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", "))]
    UnsupportedVersion { version: String },
    #[error("plugin {kind:?} not found in {dirs:?}")]
    PluginNotFound { kind: String, dirs: Vec<PathBuf> },
}

/// Where CNI configs and plugins live (the `[cni]` table of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Directory searched for network configs; the lexically first valid `.conflist`, `.conf` or
    /// `.json` file is the pod network.
    pub conf_dir: PathBuf,
    /// Directories searched, in order, for plugin binaries (also passed to plugins as CNI_PATH).
    pub plugin_dirs: Vec<PathBuf>,
    /// A plugin still running after this many seconds is killed (with its process group) and the
    /// ADD or DEL fails.
    pub plugin_timeout_secs: u64,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            // /usr/lib/cni is where Debian's containernetworking-plugins installs them.
            plugin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            plugin_timeout_secs: 60,
        }
    }
}

/// Whether pods can get a network now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkReadiness {
    Ready { network: String, config_file: PathBuf },
    NotReady { message: String },
}

/// Why there is no pod network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NoNetwork {
    pub message: String,
    /// Whether config files exist (none of them usable) or there are none at all.
    pub configs_exist: bool,
}

/// A network configuration list, ready to run: every plugin has a type, the version is one this
/// runtime speaks.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    /// The list as JSON, in conflist form (a single-plugin `.conf` wrapped into a list), as it is
    /// cached for DEL.
    pub(crate) raw: Value,
    pub(crate) plugins: Vec<Map<String, Value>>,
}

impl CniConfig {
    /// Looks for a usable network config now. Cheap enough to call on every `Status`: the config
    /// dir holds a handful of small files, and reading it each time means a config dropped in
    /// later is seen without a restart.
    pub fn readiness(&self) -> NetworkReadiness {
        match self.find_network() {
            Ok((network, config_file)) => NetworkReadiness::Ready { network: network.name, config_file },
            Err(none) => NetworkReadiness::NotReady { message: none.message },
        }
    }

    /// The pod network: the first valid config file, parsed, and the file's path.
    pub(crate) fn find_network(&self) -> Result<(NetworkList, PathBuf), NoNetwork> {
        let entries = std::fs::read_dir(&self.conf_dir).map_err(|e| NoNetwork {
            message: format!("cannot read CNI config dir {}: {e}", self.conf_dir.display()),
            configs_exist: false,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| config_kind(path).is_some())
            .collect();
        files.sort();
        let mut problems = Vec::new();
        for file in &files {
            match self.read_config_file(file) {
                Ok(network) => return Ok((network, file.clone())),
                Err(problem) => problems.push(format!("{}: {problem}", file.display())),
            }
        }
        if problems.is_empty() {
            Err(NoNetwork {
                message: format!("no CNI network config found in {}", self.conf_dir.display()),
                configs_exist: false,
            })
        } else {
            Err(NoNetwork {
                message: format!("no valid CNI network config in {}: {}", self.conf_dir.display(), problems.join("; ")),
                configs_exist: true,
            })
        }
    }

    /// Reads and validates one config file; every plugin it names must be installed.
    fn read_config_file(&self, file: &Path) -> Result<NetworkList, ConfigError> {
        let text = std::fs::read_to_string(file)?;
        let value: Value = serde_json::from_str(&text)?;
        let network = match config_kind(file) {
            Some(ConfigKind::List) => NetworkList::from_list(value)?,
            _ => NetworkList::from_single(value)?,
        };
        for kind in network.plugin_types() {
            if self.find_plugin(kind).is_none() {
                return Err(ConfigError::PluginNotFound { kind: kind.into(), dirs: self.plugin_dirs.clone() });
            }
        }
        Ok(network)
    }

    /// The path of plugin binary `kind` in the first plugin dir that has it.
    pub fn find_plugin(&self, kind: &str) -> Option<PathBuf> {
        if kind.is_empty() || kind.contains('/') || kind == "." || kind == ".." {
            return None;
        }
        self.plugin_dirs.iter().map(|dir| dir.join(kind)).find(|path| path.is_file())
    }

    /// CNI_PATH: the plugin dirs, for plugins that call others (IPAM).
    pub(crate) fn cni_path(&self) -> String {
        let dirs: Vec<String> = self.plugin_dirs.iter().map(|d| d.display().to_string()).collect();
        dirs.join(":")
    }
}

enum ConfigKind {
    List,
    Single,
}

/// As libcni: `.conflist` files are lists, `.conf` and `.json` files single plugins.
fn config_kind(path: &Path) -> Option<ConfigKind> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("conflist") => Some(ConfigKind::List),
        Some("conf" | "json") => Some(ConfigKind::Single),
        _ => None,
    }
}

impl NetworkList {
    /// A `.conflist`: `{"cniVersion", "name", "plugins": [...]}`.
    pub(crate) fn from_list(value: Value) -> Result<NetworkList, ConfigError> {
        let object = value.as_object().ok_or(ConfigError::NotAnObject)?;
        let name = network_name(object)?;
        let cni_version = cni_version(object)?;
        let plugins = object
            .get("plugins")
            .ok_or(ConfigError::Missing("plugins"))?
            .as_array()
            .ok_or(ConfigError::PluginsNotAList)?;
        if plugins.is_empty() {
            return Err(ConfigError::NoPlugins);
        }
        let mut checked = Vec::new();
        for plugin in plugins {
            let plugin = plugin.as_object().ok_or(ConfigError::PluginNotAnObject)?;
            match plugin.get("type").and_then(|t| t.as_str()) {
                Some(kind) if !kind.is_empty() => {}
                _ => return Err(ConfigError::PluginWithoutType),
            }
            checked.push(plugin.clone());
        }
        Ok(NetworkList { name, cni_version, raw: value, plugins: checked })
    }

    /// A single-plugin `.conf`, wrapped into a list as libcni does.
    fn from_single(value: Value) -> Result<NetworkList, ConfigError> {
        let object = value.as_object().ok_or(ConfigError::NotAnObject)?;
        if object.contains_key("plugins") {
            return Err(ConfigError::ListInSingle);
        }
        let list = serde_json::json!({
            "cniVersion": object.get("cniVersion").cloned().unwrap_or(Value::Null),
            "name": object.get("name").cloned().unwrap_or(Value::Null),
            "plugins": [value],
        });
        NetworkList::from_list(list)
    }

    /// The plugin types, in ADD order.
    pub fn plugin_types(&self) -> impl Iterator<Item = &str> {
        self.plugins.iter().map(|p| p.get("type").and_then(|t| t.as_str()).unwrap_or_default())
    }

    /// The type of a plugin that gets its IP ranges only from the runtime: it declares the
    /// `ipRanges` capability and its `ipam` has no ranges of its own (host-local's `ranges`,
    /// `range` or `subnet`). Such a network cannot give pods addresses before the pod CIDR is set.
    pub(crate) fn ranges_only_from_pod_cidr(&self) -> Option<&str> {
        self.plugins.iter().find_map(|plugin| {
            let declared = plugin.get("capabilities").and_then(|c| c.get("ipRanges")) == Some(&Value::Bool(true));
            let ipam = plugin.get("ipam")?;
            let own_ranges =
                ["ranges", "range", "subnet"].iter().any(|key| ipam.get(key).is_some_and(|v| !v.is_null()));
            (declared && !own_ranges).then(|| plugin.get("type").and_then(|t| t.as_str()).unwrap_or_default())
        })
    }

    /// Whether DEL gets the ADD result as prevResult (spec 0.4.0 and later).
    pub(crate) fn del_gets_prev_result(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }

    /// The config one plugin gets on stdin (spec: "Deriving execution configuration from plugin
    /// configuration"): the plugin's object with the list's name and cniVersion, the previous
    /// result, and a runtimeConfig holding exactly the runtime values for the capabilities the
    /// plugin declares. `capabilities` itself is removed, as the spec asks.
    pub(crate) fn plugin_input(
        &self,
        index: usize,
        prev_result: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Value {
        let mut config = self.plugins[index].clone();
        let declared = config.remove("capabilities");
        config.insert("name".into(), Value::String(self.name.clone()));
        config.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        let mut runtime_config = Map::new();
        if let Some(Value::Object(declared)) = declared {
            for (capability, enabled) in declared {
                if enabled == Value::Bool(true)
                    && let Some(value) = capability_args.get(&capability)
                {
                    runtime_config.insert(capability, value.clone());
                }
            }
        }
        // runtimeConfig is the runtime's to fill: a static one in the file is not passed on.
        config.remove("runtimeConfig");
        if !runtime_config.is_empty() {
            config.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        config.remove("prevResult");
        if let Some(prev) = prev_result {
            config.insert("prevResult".into(), prev.clone());
        }
        Value::Object(config)
    }
}

fn network_name(object: &Map<String, Value>) -> Result<String, ConfigError> {
    let name = object.get("name").and_then(|n| n.as_str()).ok_or(ConfigError::Missing("name"))?;
    // As libcni validates it; the name is also part of the result cache's file names.
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(ConfigError::BadName(name.into()));
    }
    Ok(name.to_string())
}

fn cni_version(object: &Map<String, Value>) -> Result<String, ConfigError> {
    let version = object.get("cniVersion").and_then(|v| v.as_str()).ok_or(ConfigError::Missing("cniVersion"))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(ConfigError::UnsupportedVersion { version: version.into() });
    }
    Ok(version.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config_in(dir: &Path) -> CniConfig {
        let plugins = dir.join("bin");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::write(plugins.join("bridge"), "").unwrap();
        std::fs::write(plugins.join("portmap"), "").unwrap();
        CniConfig { conf_dir: dir.join("net.d"), plugin_dirs: vec![plugins], ..Default::default() }
    }

    #[test]
    fn missing_dir_is_not_ready_and_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let NetworkReadiness::NotReady { message } = config.readiness() else { panic!("ready") };
        assert!(message.contains("net.d"), "{message}");
        assert!(!config.find_network().unwrap_err().configs_exist);
    }

    #[test]
    fn first_valid_conflist_wins_and_broken_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        std::fs::create_dir_all(&config.conf_dir).unwrap();
        std::fs::write(config.conf_dir.join("05-broken.conflist"), "{").unwrap();
        std::fs::write(
            config.conf_dir.join("10-missing-plugin.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"nosuch"}]}"#,
        )
        .unwrap();
        std::fs::write(
            config.conf_dir.join("11-old.conflist"),
            r#"{"cniVersion":"0.2.0","name":"a","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            config.conf_dir.join("12-bad-name.conflist"),
            r#"{"cniVersion":"1.0.0","name":"../x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(config.conf_dir.join("13-empty.conflist"), r#"{"cniVersion":"1.0.0","name":"a","plugins":[]}"#)
            .unwrap();
        std::fs::write(config.conf_dir.join("README.md"), "not a config").unwrap();
        let NetworkReadiness::NotReady { message } = config.readiness() else { panic!("ready") };
        for expected in ["05-broken", "nosuch", "\"0.2.0\" is not supported", "\"../x\"", "\"plugins\" is empty"] {
            assert!(message.contains(expected), "{expected}: {message}");
        }
        assert!(config.find_network().unwrap_err().configs_exist);

        std::fs::write(
            config.conf_dir.join("20-pods.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert_eq!(
            config.readiness(),
            NetworkReadiness::Ready { network: "pods".into(), config_file: config.conf_dir.join("20-pods.conflist") }
        );
        let (network, _) = config.find_network().unwrap();
        assert_eq!(network.plugin_types().collect::<Vec<_>>(), ["bridge", "portmap"]);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        std::fs::create_dir_all(&config.conf_dir).unwrap();
        std::fs::write(
            config.conf_dir.join("10-one.conf"),
            r#"{"cniVersion":"0.4.0","name":"one","type":"bridge","bridge":"br9"}"#,
        )
        .unwrap();
        let (network, file) = config.find_network().unwrap();
        assert_eq!(file, config.conf_dir.join("10-one.conf"));
        assert_eq!((network.name.as_str(), network.cni_version.as_str()), ("one", "0.4.0"));
        assert_eq!(network.raw["plugins"][0]["bridge"], "br9");
        // A list in a .conf file is a mistake libcni refuses too.
        std::fs::write(
            config.conf_dir.join("05-list.conf"),
            r#"{"cniVersion":"1.0.0","name":"l","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let (network, _) = config.find_network().unwrap();
        assert_eq!(network.name, "one");
    }

    #[test]
    fn plugin_input_chains_and_fills_only_declared_capabilities() {
        let list = NetworkList::from_list(json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}, "capabilities": {"ipRanges": true}},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}, "runtimeConfig": {"stale": 1}},
                {"type": "tuning", "prevResult": {"stale": true}},
            ],
        }))
        .unwrap();
        let capability_args = json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 1000},
            "ipRanges": [[{"subnet": "10.244.1.0/24"}]],
        });
        let capability_args = capability_args.as_object().unwrap();

        let first = list.plugin_input(0, None, capability_args);
        assert_eq!(
            first,
            json!({
                "type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"},
                "name": "pods", "cniVersion": "1.0.0",
                "runtimeConfig": {"ipRanges": [[{"subnet": "10.244.1.0/24"}]]},
            })
        );

        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.2/24"}]});
        let second = list.plugin_input(1, Some(&prev), capability_args);
        assert_eq!(
            second,
            json!({
                "type": "portmap", "name": "pods", "cniVersion": "1.0.0",
                "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
                "prevResult": prev,
            })
        );

        // No capabilities: no runtimeConfig; the runtime's prevResult replaces one in the file.
        let third = list.plugin_input(2, Some(&prev), capability_args);
        assert_eq!(third, json!({"type": "tuning", "name": "pods", "cniVersion": "1.0.0", "prevResult": prev}));
        assert!(list.plugin_input(2, None, capability_args).get("prevResult").is_none());
    }

    #[test]
    fn networks_that_need_the_pod_cidr_are_recognised() {
        let list = |bridge: Value| {
            NetworkList::from_list(
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [bridge, {"type": "portmap"}]}),
            )
            .unwrap()
        };
        let needs = list(json!({"type": "bridge", "ipam": {"type": "host-local"}, "capabilities": {"ipRanges": true}}));
        assert_eq!(needs.ranges_only_from_pod_cidr(), Some("bridge"));
        let own = list(
            json!({"type": "bridge", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}]]}, "capabilities": {"ipRanges": true}}),
        );
        assert_eq!(own.ranges_only_from_pod_cidr(), None);
        let undeclared = list(json!({"type": "bridge", "ipam": {"type": "dhcp"}}));
        assert_eq!(undeclared.ranges_only_from_pod_cidr(), None);
    }

    #[test]
    fn del_prev_result_from_0_4_0_on() {
        let list = |version: &str| {
            NetworkList::from_list(json!({"cniVersion": version, "name": "n", "plugins": [{"type": "bridge"}]}))
                .unwrap()
        };
        assert!(!list("0.3.1").del_gets_prev_result());
        assert!(list("0.4.0").del_gets_prev_result());
        assert!(list("1.0.0").del_gets_prev_result());
    }
}
