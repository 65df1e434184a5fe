//! The result cache: what an ADD used and returned, so that DEL can give every plugin the same
//! config, CNI_ARGS and runtimeConfig, and the ADD result as prevResult, after a daemon restart
//! or a change of the config files, as the CNI spec asks of runtimes.
//!
//! Laid out as libcni lays out /var/lib/cni/results, under the runtime's state root:
//! `<state_root>/cni/results/<network>-<container id>-<ifname>.json`. The entry is written
//! before the first plugin runs (without a result) and again after each plugin's ADD with the
//! result so far, so a daemon killed in the middle of an ADD leaves what its DEL needs.
//! Unlike libcni's entries, `config` is the JSON list itself rather than base64 bytes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::CniError;
use crate::store::{read_json, write_json};

const KIND: &str = "cri-systemd-cni-cache-v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CacheEntry {
    pub kind: String,
    pub container_id: String,
    pub if_name: String,
    pub network_name: String,
    /// The network config list the ADD ran.
    pub config: Value,
    pub netns: PathBuf,
    pub cni_args: Vec<(String, String)>,
    pub capability_args: Map<String, Value>,
    /// The result of the last plugin whose ADD succeeded; none before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl CacheEntry {
    pub(crate) fn new(
        container_id: &str,
        if_name: &str,
        network_name: &str,
        config: Value,
        netns: &Path,
        cni_args: Vec<(String, String)>,
        capability_args: Map<String, Value>,
    ) -> CacheEntry {
        CacheEntry {
            kind: KIND.into(),
            container_id: container_id.into(),
            if_name: if_name.into(),
            network_name: network_name.into(),
            config,
            netns: netns.into(),
            cni_args,
            capability_args,
            result: None,
        }
    }
}

/// A cache file, with its entry or why it cannot be read.
pub(crate) type Found = (PathBuf, Result<CacheEntry, String>);

#[derive(Debug)]
pub(crate) struct ResultCache {
    dir: PathBuf,
}

impl ResultCache {
    pub(crate) fn new(dir: PathBuf) -> ResultCache {
        ResultCache { dir }
    }

    fn path(&self, entry: &CacheEntry) -> PathBuf {
        self.dir.join(format!("{}-{}-{}.json", entry.network_name, entry.container_id, entry.if_name))
    }

    /// Writes `entry` atomically (a kill leaves the old or the new version).
    pub(crate) fn write(&self, entry: &CacheEntry) -> Result<(), CniError> {
        let path = self.path(entry);
        write_json(&path, entry).map_err(|source| CniError::Cache { path, source })
    }

    /// The entries of `container_id`, each with its file; an unreadable entry comes with why.
    pub(crate) fn find(&self, container_id: &str) -> Result<Vec<Found>, CniError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CniError::Cache { path: self.dir.clone(), source }),
        };
        let infix = format!("-{container_id}-");
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.contains(&infix) {
                continue;
            }
            let path = entry.path();
            if name.ends_with(".json.tmp") {
                // What a kill during a write leaves; the .json beside it is complete.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let read = match read_json::<CacheEntry>(&path) {
                Ok(cached) if cached.container_id != container_id => continue,
                Ok(cached) if cached.kind != KIND => Err(format!("unknown cache entry kind {:?}", cached.kind)),
                Ok(cached) => Ok(cached),
                Err(e) => Err(e.to_string()),
            };
            found.push((path, read));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    pub(crate) fn remove(&self, path: &Path) -> Result<(), CniError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CniError::Cache { path: path.into(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn entries_are_found_by_container_and_survive_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(dir.path().join("results"));
        assert!(cache.find("abc").unwrap().is_empty(), "no dir yet is no entry");
        let mut entry = CacheEntry::new(
            "abc",
            "eth0",
            "pods",
            json!({"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}]}),
            Path::new("/run/x/net"),
            vec![("K8S_POD_NAME".into(), "web".into())],
            Map::new(),
        );
        cache.write(&entry).unwrap();
        entry.result = Some(json!({"cniVersion": "1.0.0", "ips": []}));
        cache.write(&entry).unwrap();
        let other = CacheEntry::new("abcd", "eth0", "pods", json!({}), Path::new("/n"), vec![], Map::new());
        cache.write(&other).unwrap();
        std::fs::write(dir.path().join("results/pods-abc-eth0.json.tmp"), "{").unwrap();

        let found = cache.find("abc").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, dir.path().join("results/pods-abc-eth0.json"));
        assert_eq!(found[0].1.as_ref().unwrap(), &entry);
        assert!(!dir.path().join("results/pods-abc-eth0.json.tmp").exists());
        // The file is what the layout says, readable by anyone debugging a node.
        let text = std::fs::read_to_string(&found[0].0).unwrap();
        assert!(text.contains("\"containerId\": \"abc\"") && text.contains("\"cniArgs\""), "{text}");

        cache.remove(&found[0].0).unwrap();
        cache.remove(&found[0].0).unwrap();
        assert!(cache.find("abc").unwrap().is_empty());
        assert_eq!(cache.find("abcd").unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_entry_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pods-abc-eth0.json"), "{").unwrap();
        let found = ResultCache::new(dir.path().into()).find("abc").unwrap();
        assert_eq!(found.len(), 1);
        assert!(found[0].1.is_err());
    }
}
