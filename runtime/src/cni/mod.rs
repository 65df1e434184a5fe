//! Pod networking through CNI (spec 1.0.0; 0.3.x and 0.4.0 configs too): the node's network
//! config (`config`), plugin runs (`exec`), the runtimeConfig and CNI_ARGS a pod brings
//! (`capabilities`), the pod IPs of a result (`result`), and the result cache that lets DEL run
//! with what ADD used and returned, across daemon restarts and config changes (`cache`).
//!
//! One network per pod, on interface eth0 of the pod's pinned network namespace. The pod's
//! operation lock serialises its ADD and DEL; plugins of different pods run concurrently (IPAM
//! plugins lock their own stores).
//!
//! # ADD and DEL, crash-safe
//!
//! After the namespaces are pinned (and the record saved, state `Creating`), CNI ADD runs the
//! network's plugins on the pinned netns file, each with the previous one's result. The result
//! cache (`<state_root>/cni/results/`) is written before the first plugin and after each, so DEL
//! undoes whatever part ran, with the config and runtimeConfig of the ADD, even after a kill or a
//! config change. Plugins run in a process group of their own (killed on timeout) with
//! `PR_SET_PDEATHSIG`, so no ADD of a killed daemon races the DEL of the restarted one. The pod's
//! IPs go into its record, PodSandboxStatus and its `/etc/hosts`.

mod cache;
mod capabilities;
mod config;
mod exec;
mod result;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, info, warn};

pub(crate) use capabilities::{capability_args, check_cni_arg, k8s_args};
pub use config::{CniConfig, NetworkList, NetworkReadiness};

use cache::{CacheEntry, ResultCache};
use exec::PluginRun;

use crate::Error;
use crate::store::{read_json, write_json};

/// The pod's interface in its network namespace, as every Kubernetes runtime names it.
pub const POD_INTERFACE: &str = "eth0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
        })
    }
}

/// Told of every ADD, and of every DEL that had something to undo: how long it took and whether it
/// worked. The daemon counts them for its Prometheus metrics; the runtime knows no metrics library.
pub trait CniObserver: Send + Sync + std::fmt::Debug {
    fn observe(&self, command: CniCommand, elapsed: Duration, ok: bool);
}

/// Why a pod could not be attached to or detached from its network.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Config files exist, but none is usable.
    #[error("pod network is not ready: {0}")]
    NotReady(String),
    #[error("cni plugin {plugin:?} not found in {dirs}")]
    PluginNotFound { plugin: String, dirs: String },
    /// The plugin's own error, as it printed it.
    #[error("cni plugin {plugin} {command} failed: {msg}{}{} (cni error code {code})",
        if details.is_empty() { "" } else { ": " }, details)]
    Plugin { plugin: String, command: CniCommand, code: u64, msg: String, details: String },
    /// The plugin failed without a CNI error: what it wrote instead.
    #[error("cni plugin {plugin} {command} failed ({status}){}{}", if output.is_empty() { "" } else { ": " }, output)]
    Failed { plugin: String, command: CniCommand, status: String, output: String },
    #[error("cni plugin {plugin} {command} did not finish within {seconds} s and was killed")]
    Timeout { plugin: String, command: CniCommand, seconds: u64 },
    #[error("cannot run cni plugin {plugin}: {source}")]
    Spawn { plugin: String, source: std::io::Error },
    #[error("cni plugin {plugin} {command} printed an unusable result: {reason}")]
    BadResult { plugin: String, command: CniCommand, reason: String },
    #[error("cni result cache {}: {source}", .path.display())]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("cni result cache {}: {reason}", .path.display())]
    BadCacheEntry { path: PathBuf, reason: String },
    /// What the pod would pass to plugins cannot be passed (CNI_ARGS, capability args, pod CIDRs).
    #[error("{0}")]
    InvalidArgs(String),
}

impl CniError {
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self {
            // The node's network is not set up (yet): the kubelet waits for NetworkReady.
            CniError::NotReady(_) | CniError::PluginNotFound { .. } => K::FailedPrecondition,
            // CNI error code 11: "try again later".
            CniError::Plugin { code: 11, .. } => K::Unavailable,
            // Failures of another program (the plugin), not of this daemon.
            CniError::Plugin { .. }
            | CniError::Failed { .. }
            | CniError::Timeout { .. }
            | CniError::BadResult { .. } => K::External,
            CniError::Spawn { .. } | CniError::Cache { .. } | CniError::BadCacheEntry { .. } => K::Internal,
            CniError::InvalidArgs(_) => K::InvalidArgument,
        }
    }
}

/// What one pod brings to its ADD.
#[derive(Debug, Clone)]
pub(crate) struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub cni_args: Vec<(String, String)>,
    pub capability_args: Map<String, Value>,
}

/// The pod CIDRs as persisted: the kubelet sends them once (UpdateRuntimeConfig), not again
/// after a daemon restart.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodCidrs {
    pod_cidrs: Vec<String>,
}

/// CNI for the pods of this node.
#[derive(Debug)]
pub(crate) struct Cni {
    config: CniConfig,
    cache: ResultCache,
    pod_cidrs: RwLock<Vec<String>>,
    pod_cidrs_file: PathBuf,
    observer: std::sync::OnceLock<std::sync::Arc<dyn CniObserver>>,
}

impl Cni {
    /// CNI state lives in `<state_root>/cni`: `results/` (the cache) and `pod-cidrs.json`.
    pub(crate) fn open(config: CniConfig, state_root: &Path) -> Cni {
        let dir = state_root.join("cni");
        let pod_cidrs_file = dir.join("pod-cidrs.json");
        let pod_cidrs = match read_json::<PodCidrs>(&pod_cidrs_file) {
            Ok(saved) => match capabilities::parse_pod_cidrs(&saved.pod_cidrs.join(",")) {
                Ok(cidrs) => cidrs,
                Err(e) => {
                    warn!("ignoring the saved pod CIDRs in {}: {e}", pod_cidrs_file.display());
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!("ignoring the saved pod CIDRs in {}: {e}", pod_cidrs_file.display());
                Vec::new()
            }
        };
        Cni {
            config,
            cache: ResultCache::new(dir.join("results")),
            pod_cidrs: RwLock::new(pod_cidrs),
            pod_cidrs_file,
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Sets who is told of ADDs and DELs (once; later calls change nothing).
    pub(crate) fn set_observer(&self, observer: std::sync::Arc<dyn CniObserver>) {
        let _ = self.observer.set(observer);
    }

    fn observe(&self, command: CniCommand, started: Instant, ok: bool) {
        if let Some(observer) = self.observer.get() {
            observer.observe(command, started.elapsed(), ok);
        }
    }

    /// The pod network now. None when the config dir holds no config file at all: pods then get
    /// a network namespace with loopback only (a node without pod networking, as the kubelet
    /// never asks for such pods while Status says NetworkReady=false). Config files none of which
    /// is usable are an error: someone meant to configure a network.
    /// A network whose IP ranges come only from the pod CIDR is not ready before one is set.
    pub(crate) fn network(&self) -> Result<Option<NetworkList>, CniError> {
        match self.config.find_network() {
            Ok((network, _)) => {
                self.check_pod_cidr(&network).map_err(CniError::NotReady)?;
                Ok(Some(network))
            }
            Err(none) if none.configs_exist => Err(CniError::NotReady(none.message)),
            Err(_) => Ok(None),
        }
    }

    /// What Status reports as NetworkReady: a usable config, and a pod CIDR if it needs one.
    pub(crate) fn readiness(&self) -> NetworkReadiness {
        match self.config.find_network() {
            Ok((network, config_file)) => match self.check_pod_cidr(&network) {
                Ok(()) => NetworkReadiness::Ready { network: network.name, config_file },
                Err(message) => NetworkReadiness::NotReady { message },
            },
            Err(none) => NetworkReadiness::NotReady { message: none.message },
        }
    }

    fn check_pod_cidr(&self, network: &NetworkList) -> Result<(), String> {
        match network.ranges_only_from_pod_cidr() {
            Some(plugin) if self.pod_cidrs.read().expect("pod CIDR lock").is_empty() => Err(format!(
                "network {}: plugin {plugin} takes its IP ranges from the node's pod CIDR (capability ipRanges, no ranges \
                 of its own), and none is set yet (UpdateRuntimeConfig)",
                network.name
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn pod_cidrs(&self) -> Vec<String> {
        self.pod_cidrs.read().expect("pod CIDR lock").clone()
    }

    /// Sets the pod CIDRs (comma-separated; empty clears them) that ADDs pass as
    /// `runtimeConfig.ipRanges`. Bad input changes nothing.
    pub(crate) fn set_pod_cidrs(&self, text: &str) -> Result<Vec<String>, Error> {
        let cidrs = capabilities::parse_pod_cidrs(text)?;
        let mut current = self.pod_cidrs.write().expect("pod CIDR lock");
        if *current != cidrs {
            write_json(&self.pod_cidrs_file, &PodCidrs { pod_cidrs: cidrs.clone() })
                .map_err(Error::io(format!("cannot write {}", self.pod_cidrs_file.display())))?;
            info!(pod_cidrs = ?cidrs, "pod CIDRs set");
            *current = cidrs.clone();
        }
        Ok(cidrs)
    }

    /// ADD: runs the network's plugins in order, each with the previous one's result, and returns
    /// the pod's IPs. The cache entry is written before the first plugin runs and after each one,
    /// so that `del` undoes whatever part of this ran, even after the daemon was killed. On error
    /// the caller runs `del`.
    #[tracing::instrument(name = "cni.add", skip_all, fields(cni.network = %network.name, sandbox.id = %attachment.container_id))]
    pub(crate) async fn add(&self, network: &NetworkList, attachment: &Attachment) -> Result<Vec<IpAddr>, CniError> {
        let started = Instant::now();
        let added = self.add_plugins(network, attachment, started).await;
        self.observe(CniCommand::Add, started, added.is_ok());
        added
    }

    async fn add_plugins(
        &self,
        network: &NetworkList,
        attachment: &Attachment,
        started: Instant,
    ) -> Result<Vec<IpAddr>, CniError> {
        // A missing plugin fails before any runs.
        for kind in network.plugin_types() {
            self.plugin_path(kind)?;
        }
        let mut entry = CacheEntry::new(
            &attachment.container_id,
            POD_INTERFACE,
            &network.name,
            network.raw.clone(),
            &attachment.netns,
            attachment.cni_args.clone(),
            attachment.capability_args.clone(),
        );
        self.cache.write(&entry)?;
        for index in 0..network.plugins.len() {
            let stdout = self
                .invoke(network, index, CniCommand::Add, &entry, Some(&attachment.netns), entry.result.as_ref())
                .await?;
            let plugin = network.plugin_types().nth(index).unwrap_or_default().to_string();
            let bad = |reason: String| CniError::BadResult { plugin: plugin.clone(), command: CniCommand::Add, reason };
            let result: Value = serde_json::from_slice(&stdout).map_err(|e| bad(format!("not JSON: {e}")))?;
            if !result.is_object() {
                return Err(bad("not a JSON object".into()));
            }
            entry.result = Some(result);
            self.cache.write(&entry)?;
        }
        let final_result = entry.result.as_ref().expect("a network has plugins");
        let last = network.plugin_types().last().unwrap_or_default().to_string();
        let ips = result::pod_ips(final_result, POD_INTERFACE).map_err(|reason| CniError::BadResult {
            plugin: last,
            command: CniCommand::Add,
            reason,
        })?;
        if ips.is_empty() {
            warn!(pod = %attachment.container_id, network = %network.name, "the network gave the pod no IP address");
        }
        info!(pod = %attachment.container_id, network = %network.name, ips = ?ips, elapsed = ?started.elapsed(), "pod network attached");
        Ok(ips)
    }

    /// DEL: for each cached ADD of this container (normally one), runs the cached network's
    /// plugins in reverse order with the cached CNI_ARGS and runtimeConfig and, from spec 0.4.0
    /// on, the cached result as prevResult; then drops the entry. No entry: nothing to undo (no
    /// ADD ran, or a DEL already finished), so calling it again is harmless. As the spec asks,
    /// the first failing plugin stops the DEL; the entry stays for the next try. `netns` is none
    /// when the namespace is gone.
    #[tracing::instrument(name = "cni.del", skip_all, fields(sandbox.id = %container_id))]
    pub(crate) async fn del(&self, container_id: &str, netns: Option<&Path>) -> Result<(), CniError> {
        for (path, read) in self.cache.find(container_id)? {
            let started = Instant::now();
            let deleted = self.del_entry(container_id, netns, path, read, started).await;
            self.observe(CniCommand::Del, started, deleted.is_ok());
            deleted?;
        }
        Ok(())
    }

    /// DEL of one cached ADD.
    async fn del_entry(
        &self,
        container_id: &str,
        netns: Option<&Path>,
        path: PathBuf,
        read: Result<CacheEntry, String>,
        started: Instant,
    ) -> Result<(), CniError> {
        let entry = match read {
            Ok(entry) => entry,
            Err(reason) => self.fallback_entry(container_id, &path, reason)?,
        };
        let network = NetworkList::from_list(entry.config.clone())
            .map_err(|e| CniError::BadCacheEntry { path: path.clone(), reason: e.to_string() })?;
        let prev_result = if network.del_gets_prev_result() { entry.result.as_ref() } else { None };
        for index in (0..network.plugins.len()).rev() {
            self.invoke(&network, index, CniCommand::Del, &entry, netns, prev_result).await?;
        }
        self.cache.remove(&path)?;
        info!(pod = %container_id, network = %network.name, elapsed = ?started.elapsed(), "pod network detached");
        Ok(())
    }

    /// For an entry that cannot be read (it never should: entries are written atomically), a DEL
    /// with the current config and no prevResult, as libcni does without a cached result: better
    /// than a pod that can never be removed.
    fn fallback_entry(&self, container_id: &str, path: &Path, reason: String) -> Result<CacheEntry, CniError> {
        let Ok((network, _)) = self.config.find_network() else {
            return Err(CniError::BadCacheEntry {
                path: path.into(),
                reason: format!("{reason}, and there is no network config to DEL with"),
            });
        };
        warn!(pod = %container_id, "cni result cache {} is unusable ({reason}): DEL with the current config of {}", path.display(), network.name);
        Ok(CacheEntry::new(
            container_id,
            POD_INTERFACE,
            &network.name,
            network.raw,
            Path::new(""),
            Vec::new(),
            Map::new(),
        ))
    }

    fn plugin_path(&self, kind: &str) -> Result<PathBuf, CniError> {
        self.config.find_plugin(kind).ok_or_else(|| CniError::PluginNotFound {
            plugin: kind.into(),
            dirs: format!("{:?}", self.config.plugin_dirs),
        })
    }

    /// Runs plugin `index` of `network` for the attachment `entry` describes.
    async fn invoke(
        &self,
        network: &NetworkList,
        index: usize,
        command: CniCommand,
        entry: &CacheEntry,
        netns: Option<&Path>,
        prev_result: Option<&Value>,
    ) -> Result<Vec<u8>, CniError> {
        let kind = network.plugin_types().nth(index).unwrap_or_default().to_string();
        let path = self.plugin_path(&kind)?;
        let input = network.plugin_input(index, prev_result, &entry.capability_args);
        let env = exec::cni_env(
            command,
            &entry.container_id,
            netns,
            &entry.if_name,
            &entry.cni_args,
            &self.config.cni_path(),
        );
        debug!(pod = %entry.container_id, plugin = %kind, %command, "running cni plugin");
        let run = PluginRun {
            plugin: kind,
            path,
            command,
            env,
            stdin: serde_json::to_vec(&input).expect("JSON values serialize"),
            timeout: Duration::from_secs(self.config.plugin_timeout_secs),
        };
        run.run().await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    /// A node's worth of CNI in a temp dir: plugins are shell scripts that log what they get.
    struct Fixture {
        dir: tempfile::TempDir,
        cni: Cni,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let bin = dir.path().join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
            let config =
                CniConfig { conf_dir: dir.path().join("net.d"), plugin_dirs: vec![bin], plugin_timeout_secs: 10 };
            let cni = Cni::open(config, &dir.path().join("state"));
            Fixture { dir, cni }
        }

        fn log(&self) -> PathBuf {
            self.dir.path().join("log")
        }

        /// A plugin that logs "<type> <command> <stdin>" and answers ADD with `add_output`.
        fn plugin(&self, name: &str, add_output: &str) {
            let path = self.dir.path().join("bin").join(name);
            let log = self.log();
            std::fs::write(&path, format!(
                "#!/bin/sh\nin=$(cat)\nprintf '%s %s %s %s\\n' {name} \"$CNI_COMMAND\" \"$CNI_NETNS\" \"$in\" >> {log}\n\
                 [ \"$CNI_COMMAND\" = ADD ] && printf '%s' '{add_output}'\nexit 0\n",
                log = log.display()
            )).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }

        fn conflist(&self, text: &str) {
            std::fs::write(self.dir.path().join("net.d/10-pods.conflist"), text).unwrap();
        }

        fn logged(&self) -> Vec<(String, String, String, Value)> {
            std::fs::read_to_string(self.log())
                .unwrap_or_default()
                .lines()
                .map(|line| {
                    let mut parts = line.splitn(4, ' ');
                    let mut next = || parts.next().unwrap().to_string();
                    (next(), next(), next(), serde_json::from_str(&next()).unwrap())
                })
                .collect()
        }

        fn attachment(&self) -> Attachment {
            Attachment {
                container_id: "pod1".into(),
                netns: self.dir.path().join("netns"),
                cni_args: k8s_args("ns", "web", "pod1", "uid"),
                capability_args: json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
                    .as_object()
                    .unwrap()
                    .clone(),
            }
        }
    }

    const BRIDGE_RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"},{"name":"eth0","sandbox":"/ns"}],"ips":[{"interface":1,"address":"10.88.0.7/16"}]}"#;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn add_chains_results_and_del_reverses_with_the_cached_result() {
        let fixture = Fixture::new();
        fixture.plugin("bridge", BRIDGE_RESULT);
        // portmap passes its prevResult on, as chained plugins do.
        fixture.plugin("portmap", BRIDGE_RESULT);
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#);
        let network = fixture.cni.network().unwrap().unwrap();
        let attachment = fixture.attachment();
        let ips = runtime().block_on(fixture.cni.add(&network, &attachment)).unwrap();
        assert_eq!(ips, vec!["10.88.0.7".parse::<IpAddr>().unwrap()]);

        let logged = fixture.logged();
        assert_eq!(logged.len(), 2);
        let netns = attachment.netns.display().to_string();
        assert_eq!(
            (logged[0].0.as_str(), logged[0].1.as_str(), logged[0].2.as_str()),
            ("bridge", "ADD", netns.as_str())
        );
        assert!(logged[0].3.get("prevResult").is_none() && logged[0].3.get("runtimeConfig").is_none());
        assert_eq!(logged[1].3["prevResult"], serde_json::from_str::<Value>(BRIDGE_RESULT).unwrap());
        assert_eq!(logged[1].3["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);

        // The config changes (another network, no portmap): DEL still runs what ADD ran.
        std::fs::remove_file(fixture.log()).unwrap();
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#);
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        let logged = fixture.logged();
        let order: Vec<(&str, &str)> = logged.iter().map(|l| (l.0.as_str(), l.1.as_str())).collect();
        assert_eq!(order, vec![("portmap", "DEL"), ("bridge", "DEL")]);
        for (_, _, netns, input) in &logged {
            assert_eq!(netns, "", "no namespace: CNI_NETNS is empty");
            assert_eq!(input["name"], "pods");
            assert_eq!(input["prevResult"]["ips"][0]["address"], "10.88.0.7/16");
        }
        assert_eq!(logged[0].3["runtimeConfig"]["portMappings"][0]["containerPort"], 80);

        // Done: a second DEL has nothing to do.
        std::fs::remove_file(fixture.log()).unwrap();
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        assert!(fixture.logged().is_empty());
    }

    /// Records what the runtime reports to the daemon's metrics.
    #[derive(Debug, Default)]
    struct Observed(std::sync::Mutex<Vec<(CniCommand, bool)>>);

    impl CniObserver for Observed {
        fn observe(&self, command: CniCommand, _elapsed: Duration, ok: bool) {
            self.0.lock().unwrap().push((command, ok));
        }
    }

    #[test]
    fn the_observer_hears_of_adds_and_of_dels_with_something_to_undo() {
        let fixture = Fixture::new();
        let observed = std::sync::Arc::new(Observed::default());
        fixture.cni.set_observer(observed.clone());
        fixture.plugin("bridge", BRIDGE_RESULT);
        let broken = fixture.dir.path().join("bin/broken");
        std::fs::write(&broken, "#!/bin/sh\ncat >/dev/null\nexit 1\n").unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"broken"}]}"#);
        let network = fixture.cni.network().unwrap().unwrap();
        runtime().block_on(fixture.cni.add(&network, &fixture.attachment())).unwrap_err();
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#);
        let network = fixture.cni.network().unwrap().unwrap();
        runtime().block_on(fixture.cni.add(&network, &fixture.attachment())).unwrap();
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        let observed = observed.0.lock().unwrap().clone();
        assert_eq!(observed, vec![(CniCommand::Add, false), (CniCommand::Add, true), (CniCommand::Del, true)]);
    }

    #[test]
    fn a_failed_add_leaves_what_del_needs() {
        let fixture = Fixture::new();
        fixture.plugin("bridge", BRIDGE_RESULT);
        let broken = fixture.dir.path().join("bin/broken");
        std::fs::write(
            &broken,
            "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\n\
            echo '{\"cniVersion\":\"0.4.0\",\"code\":11,\"msg\":\"no leases\",\"details\":\"pool empty\"}'\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        fixture.conflist(r#"{"cniVersion":"0.4.0","name":"pods","plugins":[{"type":"bridge"},{"type":"broken"}]}"#);
        let network = fixture.cni.network().unwrap().unwrap();
        let err = runtime().block_on(fixture.cni.add(&network, &fixture.attachment())).unwrap_err();
        assert_eq!(err.to_string(), "cni plugin broken ADD failed: no leases: pool empty (cni error code 11)");

        let cached = fixture.cni.cache.find("pod1").unwrap();
        let entry = cached[0].1.as_ref().unwrap();
        assert_eq!(entry.result.as_ref().unwrap()["ips"][0]["address"], "10.88.0.7/16", "bridge's result is kept");
        std::fs::remove_file(fixture.log()).unwrap();
        runtime().block_on(fixture.cni.del("pod1", Some(Path::new("/ns")))).unwrap();
        let logged = fixture.logged();
        assert_eq!(logged.len(), 1, "the broken plugin logs nothing");
        assert_eq!((logged[0].1.as_str(), logged[0].2.as_str()), ("DEL", "/ns"));
        assert_eq!(logged[0].3["prevResult"]["ips"][0]["address"], "10.88.0.7/16");
        assert!(fixture.cni.cache.find("pod1").unwrap().is_empty());
    }

    #[test]
    fn a_failing_del_stops_and_keeps_the_entry_for_the_next_try() {
        let fixture = Fixture::new();
        fixture.plugin("bridge", BRIDGE_RESULT);
        fixture.plugin("portmap", BRIDGE_RESULT);
        fixture.conflist(r#"{"cniVersion":"0.3.1","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#);
        let network = fixture.cni.network().unwrap().unwrap();
        runtime().block_on(fixture.cni.add(&network, &fixture.attachment())).unwrap();
        let portmap = fixture.dir.path().join("bin/portmap");
        let working = std::fs::read(&portmap).unwrap();
        std::fs::write(&portmap, "#!/bin/sh\necho 'iptables is locked' >&2\nexit 1\n").unwrap();
        std::fs::remove_file(fixture.log()).unwrap();
        let err = runtime().block_on(fixture.cni.del("pod1", None)).unwrap_err().to_string();
        assert_eq!(err, "cni plugin portmap DEL failed (exit status 1): iptables is locked");
        assert!(fixture.logged().is_empty(), "bridge's DEL does not run after portmap's failed");
        assert_eq!(fixture.cni.cache.find("pod1").unwrap().len(), 1);

        std::fs::write(&portmap, working).unwrap();
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        let logged = fixture.logged();
        assert_eq!(logged.len(), 2);
        // Spec 0.3.x: no prevResult on DEL.
        assert!(logged.iter().all(|l| l.3.get("prevResult").is_none()), "{logged:?}");
    }

    #[test]
    fn an_unreadable_cache_entry_is_deleted_with_the_current_config() {
        let fixture = Fixture::new();
        fixture.plugin("bridge", BRIDGE_RESULT);
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#);
        let results = fixture.dir.path().join("state/cni/results");
        std::fs::create_dir_all(&results).unwrap();
        std::fs::write(results.join("pods-pod1-eth0.json"), "{").unwrap();
        runtime().block_on(fixture.cni.del("pod1", None)).unwrap();
        let logged = fixture.logged();
        assert_eq!(logged.len(), 1);
        assert_eq!((logged[0].1.as_str(), &logged[0].3["name"]), ("DEL", &json!("pods")));
        assert!(logged[0].3.get("prevResult").is_none());
        assert!(fixture.cni.cache.find("pod1").unwrap().is_empty());
    }

    #[test]
    fn no_config_at_all_is_no_network_but_broken_configs_are_an_error() {
        let fixture = Fixture::new();
        assert!(fixture.cni.network().unwrap().is_none());
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"nosuch"}]}"#);
        let err = fixture.cni.network().unwrap_err();
        assert!(matches!(err, CniError::NotReady(_)) && err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn a_network_ranged_by_the_pod_cidr_waits_for_one() {
        let fixture = Fixture::new();
        fixture.plugin("bridge", BRIDGE_RESULT);
        fixture.conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","ipam":{"type":"host-local"},"capabilities":{"ipRanges":true}}]}"#);
        let err = fixture.cni.network().unwrap_err().to_string();
        assert!(err.contains("pod CIDR") && err.contains("UpdateRuntimeConfig"), "{err}");
        assert!(
            matches!(fixture.cni.readiness(), NetworkReadiness::NotReady { message } if message.contains("pod CIDR"))
        );
        fixture.cni.set_pod_cidrs("10.244.0.0/24").unwrap();
        assert!(fixture.cni.network().unwrap().is_some());
        assert!(matches!(fixture.cni.readiness(), NetworkReadiness::Ready { .. }));
    }

    #[test]
    fn pod_cidrs_persist_and_bad_ones_change_nothing() {
        let fixture = Fixture::new();
        fixture.cni.set_pod_cidrs("10.244.3.0/24,fd00:3::/64").unwrap();
        let err = fixture.cni.set_pod_cidrs("10.244.3.1/24").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{err}");
        let reopened = Cni::open(fixture.cni.config.clone(), &fixture.dir.path().join("state"));
        assert_eq!(reopened.pod_cidrs(), vec!["10.244.3.0/24", "fd00:3::/64"]);
        reopened.set_pod_cidrs("").unwrap();
        assert!(Cni::open(fixture.cni.config.clone(), &fixture.dir.path().join("state")).pod_cidrs().is_empty());
    }
}
