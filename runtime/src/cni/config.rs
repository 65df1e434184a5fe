//! Pod networking through CNI. For now: finding the node's CNI network config, the way kubelet and
//! containerd do, so that the CRI `Status` call can say whether the network is ready.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where CNI configs and plugins live (the `[cni]` table of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Directory searched for network configs; the lexically first `.conflist`, `.conf` or
    /// `.json` file is the pod network.
    pub conf_dir: PathBuf,
    /// Directories searched, in order, for plugin binaries.
    pub plugin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            // /usr/lib/cni is where Debian's containernetworking-plugins installs them.
            plugin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

/// Whether pods can get a network now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkReadiness {
    Ready { network: String, config_file: PathBuf },
    NotReady { message: String },
}

impl CniConfig {
    /// Looks for a usable network config now. Cheap enough to call on every `Status`: the config
    /// dir holds a handful of small files, and reading it each time means a config dropped in
    /// later is seen without a restart.
    pub fn readiness(&self) -> NetworkReadiness {
        match self.find_network() {
            Ok((network, config_file)) => NetworkReadiness::Ready { network, config_file },
            Err(message) => NetworkReadiness::NotReady { message },
        }
    }

    fn find_network(&self) -> Result<(String, PathBuf), String> {
        let entries = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| format!("cannot read CNI config dir {}: {e}", self.conf_dir.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                matches!(path.extension().and_then(|e| e.to_str()), Some("conflist" | "conf" | "json"))
            })
            .collect();
        files.sort();
        let mut problems = Vec::new();
        for file in files {
            match self.check_config_file(&file) {
                Ok(network) => return Ok((network, file)),
                Err(problem) => problems.push(format!("{}: {problem}", file.display())),
            }
        }
        if problems.is_empty() {
            Err(format!("no CNI network config found in {}", self.conf_dir.display()))
        } else {
            Err(format!("no valid CNI network config in {}: {}", self.conf_dir.display(), problems.join("; ")))
        }
    }

    /// Validates one config file and returns its network name.
    fn check_config_file(&self, file: &Path) -> Result<String, String> {
        let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
        let name = config.get("name").and_then(|n| n.as_str()).ok_or("no \"name\"")?.to_string();
        let plugins: Vec<&serde_json::Value> = match config.get("plugins") {
            Some(list) => list.as_array().ok_or("\"plugins\" is not a list")?.iter().collect(),
            None => vec![&config], // a single-plugin .conf
        };
        if plugins.is_empty() {
            return Err("\"plugins\" is empty".into());
        }
        for plugin in plugins {
            let kind = plugin.get("type").and_then(|t| t.as_str()).ok_or("a plugin has no \"type\"")?;
            if self.find_plugin(kind).is_none() {
                return Err(format!("plugin {kind:?} not found in {:?}", self.plugin_dirs));
            }
        }
        Ok(name)
    }

    /// The path of plugin binary `kind` in the first plugin dir that has it.
    pub fn find_plugin(&self, kind: &str) -> Option<PathBuf> {
        if kind.contains('/') {
            return None;
        }
        self.plugin_dirs.iter().map(|dir| dir.join(kind)).find(|path| path.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_in(dir: &Path) -> CniConfig {
        let plugins = dir.join("bin");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::write(plugins.join("bridge"), "").unwrap();
        CniConfig { conf_dir: dir.join("net.d"), plugin_dirs: vec![plugins] }
    }

    #[test]
    fn missing_dir_is_not_ready_and_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let NetworkReadiness::NotReady { message } = config.readiness() else { panic!("ready") };
        assert!(message.contains("net.d"), "{message}");
    }

    #[test]
    fn first_valid_conflist_wins_and_broken_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        std::fs::create_dir_all(&config.conf_dir).unwrap();
        std::fs::write(config.conf_dir.join("05-broken.conflist"), "{").unwrap();
        std::fs::write(config.conf_dir.join("10-missing-plugin.conflist"),
            r#"{"name":"a","plugins":[{"type":"nosuch"}]}"#).unwrap();
        let NetworkReadiness::NotReady { message } = config.readiness() else { panic!("ready") };
        assert!(message.contains("05-broken") && message.contains("nosuch"), "{message}");

        std::fs::write(config.conf_dir.join("20-pods.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#).unwrap();
        assert_eq!(
            config.readiness(),
            NetworkReadiness::Ready { network: "pods".into(), config_file: config.conf_dir.join("20-pods.conflist") }
        );
    }
}
