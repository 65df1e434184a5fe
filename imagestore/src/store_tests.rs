//! ImageStore against the in-process registry: pulls, names, platform selection, dedup,
//! verification, cancellation, auth, mirrors, retries, GC and root filesystems.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::config::{RegistryConfig, StoreConfig};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::registry::Credentials;
use crate::store::{ImageStore, InUse};
use crate::test_registry::{Auth, FakeRegistry, OCI_INDEX, OCI_MANIFEST, push_image, push_index, tar_with};

fn config_for(reg: &FakeRegistry) -> StoreConfig {
    let mut config = StoreConfig { retries: 2, ..StoreConfig::default() };
    config.registries.insert(reg.host(), RegistryConfig { plain_http: true, ..Default::default() });
    config
}

fn open(root: &Path, config: StoreConfig) -> ImageStore {
    ImageStore::open(root, config).unwrap()
}

fn tmp_is_empty(root: &Path) -> bool {
    fs::read_dir(root.join("tmp")).map(|d| d.count() == 0).unwrap_or(true)
}

fn layer_count(root: &Path) -> usize {
    fs::read_dir(root.join("layers/sha256")).map(|d| d.count()).unwrap_or(0)
}

fn two_layers() -> Vec<Vec<u8>> {
    vec![tar_with(&[("bin/sh", b"shell"), ("etc/passwd", b"root:x:0:0")]), tar_with(&[("app/run", b"run")])]
}

#[tokio::test]
async fn pulls_by_tag_and_digest_and_keeps_one_image_for_two_names() {
    let reg = FakeRegistry::start().await;
    let (manifest, config) = push_image(&reg, "pause", Some("3.9"), &two_layers(), "65535", "amd64");
    push_image(&reg, "k8s/pause", Some("3.9"), &two_layers(), "65535", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let host = reg.host();

    let image = store.pull(&format!("{host}/pause:3.9"), None).await.unwrap();
    assert_eq!(image.id.to_string(), config.to_string());
    assert_eq!(image.repo_tags, [format!("{host}/pause:3.9")]);
    assert_eq!(image.repo_digests, [format!("{host}/pause@{manifest}")]);
    assert_eq!(image.config.user, "65535");
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.layers.len(), 2);
    assert!(image.size > 0);
    assert_eq!(layer_count(dir.path()), 2);
    let top = store.lease_layers(&image.id).unwrap();
    assert_eq!(fs::read(top.lowerdirs()[0].join("app/run")).unwrap(), b"run");
    assert_eq!(fs::read(top.lowerdirs()[1].join("bin/sh")).unwrap(), b"shell");

    let again = store.pull(&format!("{host}/k8s/pause:3.9"), None).await.unwrap();
    assert_eq!(again.id, image.id);
    assert_eq!(again.repo_tags, [format!("{host}/k8s/pause:3.9"), format!("{host}/pause:3.9")]);
    assert_eq!(store.images().unwrap().len(), 1);
    assert_eq!(layer_count(dir.path()), 2, "a layer was unpacked twice");
    for name in
        [format!("{host}/pause:3.9"), image.id.to_string(), config.hex().to_owned(), format!("{host}/pause@{manifest}")]
    {
        assert_eq!(store.image(&name).unwrap().map(|i| i.id), Some(image.id.clone()), "{name}");
    }
    assert!(store.image(&format!("{host}/pause:3.10")).unwrap().is_none());
    assert_eq!(store.image("Not A Reference").unwrap_err().kind(), ErrorKind::InvalidArgument);

    // Removing by one tag removes the image with all its names; absent is fine.
    store.remove(&format!("{host}/k8s/pause:3.9")).unwrap();
    assert!(store.images().unwrap().is_empty());
    assert!(store.image(&format!("{host}/pause:3.9")).unwrap().is_none());
    store.remove(&format!("{host}/k8s/pause:3.9")).unwrap();
    store.remove(&image.id.to_string()).unwrap();

    // By digest: no tag, exactly that repo digest.
    let by_digest = store.pull(&format!("{host}/pause@{manifest}"), None).await.unwrap();
    assert!(by_digest.repo_tags.is_empty());
    assert_eq!(by_digest.repo_digests, [format!("{host}/pause@{manifest}")]);
    assert!(tmp_is_empty(dir.path()));
}

#[tokio::test]
async fn can_drop_layer_blobs_after_unpacking() {
    let reg = FakeRegistry::start().await;
    push_image(&reg, "lean", Some("1"), &two_layers(), "", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreConfig { keep_layer_blobs: false, ..config_for(&reg) });
    let image = store.pull(&format!("{}/lean:1", reg.host()), None).await.unwrap();
    let blobs: Vec<_> =
        fs::read_dir(dir.path().join("blobs/sha256")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(blobs.len(), 2, "only the manifest and the config: {blobs:?}");
    assert_eq!(layer_count(dir.path()), 2);
    assert!(tmp_is_empty(dir.path()));
    let _ = store.lease_layers(&image.id).unwrap();
}

#[tokio::test]
async fn metadata_and_layers_survive_reopen() {
    let reg = FakeRegistry::start().await;
    push_image(&reg, "app", Some("1"), &two_layers(), "1000:1000", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let image = store.pull(&format!("{}/app:1", reg.host()), None).await.unwrap();
    drop(store);
    // A leftover of an interrupted pull is discarded on open.
    fs::create_dir_all(dir.path().join("tmp/layer-crashed/diff")).unwrap();
    let store = open(dir.path(), config_for(&reg));
    assert!(tmp_is_empty(dir.path()));
    let found = store.image(&format!("{}/app:1", reg.host())).unwrap().unwrap();
    assert_eq!(found, image);
    let _ = store.lease_layers(&image.id).unwrap();
    assert!(store.config_json(&image.id).unwrap().unwrap().starts_with(b"{"));
}

#[tokio::test]
async fn selects_this_nodes_platform_from_an_index() {
    let reg = FakeRegistry::start().await;
    let host_arch = crate::platform::Platform::host().architecture;
    let other = if host_arch == "amd64" { "arm64" } else { "amd64" };
    let (m_other, _) = push_image(&reg, "multi", None, &[tar_with(&[("other", b"1")])], "", other);
    let (m_host, c_host) = push_image(&reg, "multi", None, &[tar_with(&[("host", b"1")])], "", &host_arch);
    let index = push_index(
        &reg,
        "multi",
        "latest",
        &[
            ("windows/amd64", m_other.clone()),
            (&format!("linux/{other}"), m_other),
            (&format!("linux/{host_arch}"), m_host),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let image = store.pull(&format!("{}/multi", reg.host()), None).await.unwrap();
    assert_eq!(image.id.0, c_host);
    assert_eq!(image.repo_tags, [format!("{}/multi:latest", reg.host())]);
    // As containerd does, the repo digest is the index digest the name resolved to.
    assert_eq!(image.repo_digests, [format!("{}/multi@{index}", reg.host())]);

    let none = push_index(&reg, "multi", "s390", &[("linux/s390x", c_host.clone())]);
    let _ = none;
    let err = store.pull(&format!("{}/multi:s390", reg.host()), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no image for platform linux/"), "{err}");
}

#[tokio::test]
async fn concurrent_pulls_download_each_blob_once() {
    let reg = FakeRegistry::start().await;
    let big = vec![tar_with(&[("a", &vec![1u8; 400 << 10])]), tar_with(&[("b", &vec![2u8; 400 << 10])])];
    push_image(&reg, "one", Some("1"), &big, "", "amd64");
    push_image(&reg, "two", Some("1"), &big, "", "amd64");
    reg.state().blob_delay = Some(Duration::from_millis(2));
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let host = reg.host();
    let (one, two) = (format!("{host}/one:1"), format!("{host}/two:1"));
    let (a, b) = tokio::join!(store.pull(&one, None), store.pull(&two, None));
    assert_eq!(a.unwrap().id, b.unwrap().id);
    let layer_gets: usize = reg.state().hits.iter().filter(|(p, _)| p.contains("/blobs/")).map(|(_, n)| *n).sum();
    // Two layer blobs and one config blob, each fetched by exactly one of the two pulls.
    assert_eq!(layer_gets, 3, "{:?}", reg.state().hits);
}

#[tokio::test]
async fn refuses_content_that_does_not_match_its_digest() {
    let reg = FakeRegistry::start().await;
    let layers = two_layers();
    push_image(&reg, "evil", Some("1"), &layers, "", "amd64");
    let bad_layer = crate::unpack_tests::gzip(&layers[1]);
    let digest = crate::digest::Digest::sha256_of(&bad_layer);
    let mut tampered = crate::unpack_tests::gzip(&tar_with(&[("app/run", b"evil")]));
    tampered.resize(bad_layer.len(), 0);
    reg.tamper_blob(&digest, &tampered);
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let err = store.pull(&format!("{}/evil:1", reg.host()), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.to_string().contains(&digest.to_string()), "{err}");
    assert!(store.images().unwrap().is_empty());
    assert!(tmp_is_empty(dir.path()));
    assert!(!dir.path().join("blobs/sha256").join(digest.hex()).exists(), "unverified blob stored");

    // A config whose diff_ids do not describe the layers.
    let reg2 = FakeRegistry::start().await;
    let (_, _) = push_image(&reg2, "liar", Some("1"), &two_layers(), "", "amd64");
    let other = tar_with(&[("x", b"y")]);
    let gz = crate::unpack_tests::gzip(&other);
    let layer_digest = reg2.put_blob(&gz);
    let config = format!(
        r#"{{"os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        crate::digest::Digest::sha256_of(b"not the tar")
    );
    let config_digest = reg2.put_blob(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        config.len(),
        gz.len()
    );
    reg2.put_manifest("liar", Some("2"), crate::test_registry::OCI_MANIFEST, manifest.as_bytes());
    let store2 = open(&dir.path().join("s2"), config_for(&reg2));
    let err = store2.pull(&format!("{}/liar:2", reg2.host()), None).await.unwrap_err();
    assert!(err.to_string().contains("diff_id"), "{err}");
    assert!(store2.images().unwrap().is_empty());
}

#[tokio::test]
async fn a_cancelled_pull_leaves_nothing_visible() {
    let reg = FakeRegistry::start().await;
    // Incompressible, so the download takes a while at 16 KiB per 20 ms.
    let mut x: u32 = 1;
    let noise: Vec<u8> = (0..2 << 20)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    push_image(&reg, "slow", Some("1"), &[tar_with(&[("big", &noise)])], "", "amd64");
    reg.state().blob_delay = Some(Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let name = format!("{}/slow:1", reg.host());
    assert!(tokio::time::timeout(Duration::from_millis(300), store.pull(&name, None)).await.is_err());
    // The blocking unpacker notices the closed channel and cleans up.
    for _ in 0..100 {
        if tmp_is_empty(dir.path()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tmp_is_empty(dir.path()), "partial download left in tmp");
    assert!(store.image(&name).unwrap().is_none());
    assert_eq!(layer_count(dir.path()), 0);
    // And the next pull works.
    reg.state().blob_delay = None;
    store.pull(&name, None).await.unwrap();
}

#[tokio::test]
async fn authenticates_with_each_kind_of_credentials() {
    let reg = FakeRegistry::start().await;
    push_image(&reg, "private", Some("1"), &two_layers(), "", "amd64");
    let name = format!("{}/private:1", reg.host());

    reg.state().auth = Auth::Basic("alice".into(), "s3cret".into());
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let err = store.pull(&name, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
    let wrong = Credentials::Basic { username: "alice".into(), password: "wrong".into() };
    assert_eq!(store.pull(&name, Some(wrong)).await.unwrap_err().kind(), ErrorKind::Unauthenticated);
    let right = Credentials::from_docker_auth("YWxpY2U6czNjcmV0").unwrap();
    store.pull(&name, Some(right)).await.unwrap();

    reg.state().auth = Auth::Bearer { token: "access-1".into(), refresh: "refresh-1".into() };
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    store.pull(&name, Some(Credentials::RegistryToken("access-1".into()))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    store.pull(&name, Some(Credentials::IdentityToken("refresh-1".into()))).await.unwrap();
    let err = store.pull(&name, Some(Credentials::IdentityToken("stolen".into()))).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
}

#[tokio::test]
async fn tries_mirrors_in_order_and_retries_transient_failures() {
    let reg = FakeRegistry::start().await;
    push_image(&reg, "library/app", Some("1"), &two_layers(), "", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig { retries: 3, ..StoreConfig::default() };
    // docker.io is reached through the mirrors; the first one is down.
    config.registries.insert(
        "docker.io".into(),
        RegistryConfig {
            mirrors: vec!["http://127.0.0.1:1".into(), format!("http://{}", reg.host())],
            ..Default::default()
        },
    );
    // Two 503s on a layer blob are retried.
    reg.state().fail.insert("/blobs/".into(), 2);
    let store = open(dir.path(), config);
    let image = store.pull("app:1", None).await.unwrap();
    assert_eq!(image.repo_tags, ["docker.io/library/app:1"]);
    let requests = reg.state().requests.clone();
    assert!(requests.iter().any(|r| r.contains("/v2/library/app/manifests/1?ns=docker.io")), "{requests:?}");
    assert!(reg.hits("/blobs/") >= 5, "503s were not retried: {:?}", reg.state().hits);

    // An unreachable registry without mirrors is Unavailable.
    let mut config = StoreConfig { retries: 0, ..StoreConfig::default() };
    config.registries.insert("127.0.0.1:1".into(), RegistryConfig { plain_http: true, ..Default::default() });
    let store = open(&dir.path().join("s2"), config);
    let err = store.pull("127.0.0.1:1/app:1", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    // A missing image is NotFound.
    let store = open(&dir.path().join("s3"), config_for(&reg));
    let err = store.pull(&format!("{}/nothing:1", reg.host()), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    crate::unpack_tests::assert_lowercase(&err.to_string());
}

#[tokio::test]
async fn gc_keeps_what_is_used_or_pinned_and_deletes_the_rest() {
    let reg = FakeRegistry::start().await;
    push_image(&reg, "used", Some("1"), &two_layers(), "", "amd64");
    push_image(&reg, "pause", Some("3.9"), &[tar_with(&[("pause", b"p")])], "", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&reg);
    config.pinned_images = vec![format!("{}/pause:3.9", reg.host())];
    let store = open(dir.path(), config);
    let used = store.pull(&format!("{}/used:1", reg.host()), None).await.unwrap();
    let pause = store.pull(&format!("{}/pause:3.9", reg.host()), None).await.unwrap();
    assert!(pause.pinned && !used.pinned);
    let counters = store.counters();
    assert_eq!((counters.layers_unpacked, counters.layers_reused), (3, 0), "{counters:?}");
    assert!(counters.bytes_fetched > 0, "{counters:?}");
    store.pull(&format!("{}/used:1", reg.host()), None).await.unwrap();
    assert_eq!(store.counters().layers_reused, 2, "a re-pull unpacks nothing");
    assert_eq!(store.counters().layers_unpacked, 3);
    let blobs_before = fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count();

    let none = InUse::default;
    // Nothing is garbage while every image is visible.
    assert_eq!(store.gc(none).unwrap(), Default::default());
    // A removed image still used by a container keeps its content.
    store.remove(&used.id.to_string()).unwrap();
    let by_id = || InUse { images: [used.id.clone()].into(), ..Default::default() };
    let report = store.gc(by_id).unwrap();
    assert!(report.images_removed.is_empty() && report.layers_removed == 0, "{report:?}");
    // So does a lease on its layers (a container being created), with the image's record.
    let lease = store.lease_layers(&used.id).unwrap();
    assert_eq!(lease.lowerdirs().len(), 2);
    assert_eq!(store.gc(none).unwrap(), Default::default());
    // And the layer directories a container mounts, even once no image names them: its record
    // may not name its image in a way the store can read.
    let lowerdirs = lease.lowerdirs().to_vec();
    drop(lease);
    let by_layers = || InUse { layers: lowerdirs.iter().cloned().collect(), ..Default::default() };
    let report = store.gc(by_layers).unwrap();
    assert_eq!(report.images_removed, std::slice::from_ref(&used.id));
    assert_eq!(report.layers_removed, 0, "{report:?}");
    assert_eq!(report.blobs_removed, 4, "{report:?}"); // config, manifest, two layer blobs
    assert!(report.bytes_freed >= 4 * 512, "{report:?}");
    assert!(lowerdirs.iter().all(|d| d.is_dir()));
    assert_eq!(store.lease_layers(&used.id).unwrap_err().kind(), ErrorKind::NotFound);
    // Once unused they go; the pinned image stays.
    let report = store.gc(none).unwrap();
    assert_eq!((report.layers_removed, report.blobs_removed), (2, 0), "{report:?}");
    assert!(report.bytes_freed > 0, "{report:?}");
    assert_eq!(fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count(), blobs_before - 4);
    assert_eq!(store.images().unwrap().len(), 1);
    let _ = store.lease_layers(&pause.id).unwrap();
    let usage = store.usage().unwrap();
    assert!(usage.used_bytes > 0 && usage.inodes_used > 5, "{usage:?}");
    assert_eq!(usage.mountpoint, dir.path());
}

#[tokio::test]
async fn refuses_what_it_cannot_run() {
    let reg = FakeRegistry::start().await;
    let schema1 = br#"{"schemaVersion":1,"name":"old","tag":"1","fsLayers":[]}"#;
    reg.put_manifest("old", Some("1"), "application/vnd.docker.distribution.manifest.v1+prettyjws", schema1);
    let helm = reg.put_blob(b"{}");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{helm}","size":2}},"layers":[]}}"#
    );
    reg.put_manifest("chart", Some("1"), crate::test_registry::OCI_MANIFEST, manifest.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    for name in ["old:1", "chart:1"] {
        let err = store.pull(&format!("{}/{name}", reg.host()), None).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{name}: {err}");
    }
    let err = store.pull("Upper:1", None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn pulls_docker_schema2_manifests_and_lists() {
    let reg = FakeRegistry::start().await;
    let tar = tar_with(&[("hello", b"docker")]);
    let gz = crate::unpack_tests::gzip(&tar);
    let layer = reg.put_blob(&gz);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"User":"www-data"}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        crate::digest::Digest::sha256_of(&tar)
    );
    let config_digest = reg.put_blob(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{layer}","size":{}}}]}}"#,
        config.len(),
        gz.len()
    );
    let docker_v2 = "application/vnd.docker.distribution.manifest.v2+json";
    let manifest_digest = reg.put_manifest("d", None, docker_v2, manifest.as_bytes());
    let arch = crate::platform::Platform::host().architecture;
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{{"mediaType":"{docker_v2}","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}]}}"#,
        manifest.len()
    );
    reg.put_manifest("d", Some("1"), "application/vnd.docker.distribution.manifest.list.v2+json", list.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let image = store.pull(&format!("{}/d:1", reg.host()), None).await.unwrap();
    assert_eq!(image.id.0, config_digest);
    assert_eq!(image.manifest_digest, manifest_digest);
    assert_eq!(image.config.user, "www-data");
    let rootfs = store.lease_layers(&image.id).unwrap();
    assert_eq!(fs::read(rootfs.lowerdirs()[0].join("hello")).unwrap(), b"docker");
}

#[tokio::test]
async fn registry_settings_errors_are_clear() {
    let reg = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(&reg);
    config.registries.get_mut(&reg.host()).unwrap().ca_file = Some(dir.path().join("missing-ca.pem"));
    let store = open(dir.path(), config);
    let err = store.pull(&format!("{}/x:1", reg.host()), None).await.unwrap_err();
    assert!(err.to_string().contains("missing-ca.pem"), "{err}");
    let bad = StoreConfig {
        registries: [(
            "r".to_string(),
            RegistryConfig { mirrors: vec!["https://m/with/path".into()], ..Default::default() },
        )]
        .into(),
        ..StoreConfig::default()
    };
    let err = ImageStore::open(dir.path(), bad).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
}

#[tokio::test]
async fn layers_stay_in_the_recorded_uid_shift() {
    use std::os::unix::fs::MetadataExt;
    let reg = FakeRegistry::start().await;
    push_image(&reg, "app", Some("1"), &two_layers(), "", "amd64");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let image = store.pull(&format!("{}/app:1", reg.host()), None).await.unwrap();
    drop(store);
    // Foreign range by default, recorded in the metadata; the layer root included.
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(dir.path().join("metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["layer_uid_shift"], 0x7FFE_0000u32);
    let layer_dir = fs::read_dir(dir.path().join("layers/sha256")).unwrap().next().unwrap().unwrap().path();
    for path in [layer_dir.join("diff"), layer_dir.join("diff/app/run")] {
        if path.exists() {
            let md = fs::symlink_metadata(&path).unwrap();
            assert_eq!((md.uid(), md.gid()), (0x7FFE_0000, 0x7FFE_0000), "{}", path.display());
        }
    }

    // Another shift with layers on disk: refused with a message saying what to do, nothing changed.
    let before = fs::read(dir.path().join("metadata.json")).unwrap();
    let identity = StoreConfig { layer_uid_shift: 0, ..config_for(&reg) };
    let err = ImageStore::open(dir.path(), identity.clone()).unwrap_err().to_string();
    assert!(err.contains("unpacked with images.layer_uid_shift = 2147352576, but the config says 0"), "{err}");
    assert_eq!(fs::read(dir.path().join("metadata.json")).unwrap(), before);

    // A store from before the shift was recorded: its owners tell (here: the foreign range).
    let mut unrecorded = meta.clone();
    unrecorded.as_object_mut().unwrap().remove("layer_uid_shift");
    fs::write(dir.path().join("metadata.json"), serde_json::to_vec(&unrecorded).unwrap()).unwrap();
    assert!(ImageStore::open(dir.path(), identity.clone()).is_err());
    let store = open(dir.path(), config_for(&reg));
    assert!(store.image(&image.id.to_string()).unwrap().is_some());
    drop(store);
    // Unrecorded and unshifted (what the daemon wrote before): refused under the new default.
    fs::write(dir.path().join("metadata.json"), serde_json::to_vec(&unrecorded).unwrap()).unwrap();
    let mut stack = vec![dir.path().join("layers")];
    while let Some(path) = stack.pop() {
        std::os::unix::fs::lchown(&path, Some(0), Some(0)).unwrap();
        if path.is_dir() && !path.is_symlink() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    let err = ImageStore::open(dir.path(), config_for(&reg)).unwrap_err().to_string();
    assert!(err.contains("layer_uid_shift = 0, but the config says 2147352576"), "{err}");
    open(dir.path(), identity);

    // Without layers any shift is fine, and recorded.
    let empty = tempfile::tempdir().unwrap();
    open(empty.path(), StoreConfig { layer_uid_shift: 0, ..config_for(&reg) });
    open(empty.path(), config_for(&reg));
}

/// The manifest requests of a pull: (method, path) for `/manifests/`.
fn manifest_requests(reg: &FakeRegistry) -> Vec<String> {
    reg.state().requests.iter().filter(|r| r.contains("/manifests/")).cloned().collect()
}

#[tokio::test]
async fn a_repull_of_a_present_image_asks_only_for_the_manifest_digest() {
    let reg = FakeRegistry::start().await;
    let host_arch = crate::platform::Platform::host().architecture;
    let (manifest, config) = push_image(&reg, "app", Some("1"), &two_layers(), "", &host_arch);
    let index = push_index(&reg, "multi", "2", &[(&format!("linux/{host_arch}"), manifest.clone())]);
    // The index names the manifest pushed under "app"; the fake registry keys manifests by repo.
    let body = reg.state().manifests.get(&("app".to_owned(), manifest.to_string())).unwrap().clone();
    reg.put_manifest("multi", None, &body.0, &body.1);
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config_for(&reg));
    let host = reg.host();

    for name in [format!("{host}/app:1"), format!("{host}/multi:2"), format!("{host}/app@{manifest}")] {
        store.pull(&name, None).await.unwrap();
        reg.state().requests.clear();
        let metadata = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(dir.path().join("metadata.json")).unwrap());
        let written = metadata();
        let image = store.pull(&name, None).await.unwrap();
        assert_eq!(image.id.0, config);
        // Nothing changed, so nothing was written (metadata.json is replaced on every change).
        assert_eq!(metadata(), written, "{name}: the re-pull rewrote metadata.json");
        // Like containerd's resolver: one HEAD for the digest, nothing else (the manifest, the
        // config and the layers are all in the store).
        let requests = reg.state().requests.clone();
        assert_eq!(requests.len(), 1, "{name}: {requests:?}");
        assert!(requests[0].starts_with("HEAD ") && requests[0].contains("/manifests/"), "{name}: {requests:?}");
    }
    let _ = index;

    // The tag moved: the new manifest is fetched and pulled.
    let (moved, moved_config) = push_image(&reg, "app", Some("1"), &[tar_with(&[("new", b"2")])], "", &host_arch);
    reg.state().requests.clear();
    let image = store.pull(&format!("{host}/app:1"), None).await.unwrap();
    assert_eq!(image.id.0, moved_config);
    assert_eq!(image.repo_digests, [format!("{host}/app@{moved}")]);
    let requests = manifest_requests(&reg);
    assert!(requests.iter().any(|r| r.starts_with("GET ")), "{requests:?}");

    // A registry without HEAD support (405) or without the digest header still works, by GET.
    reg.state().fail.clear();
    reg.state().requests.clear();
    reg.state().no_head = true;
    let image = store.pull(&format!("{host}/app:1"), None).await.unwrap();
    assert_eq!(image.id.0, moved_config);
    let requests = manifest_requests(&reg);
    assert_eq!(requests.iter().filter(|r| r.starts_with("GET ")).count(), 1, "{requests:?}");
}

/// The signature policy in the pull: an index signed through the referrers API (the signature
/// names the index digest), a `.sig` signature found although the referrers API fails with 500
/// (asked once, not retried), an unsigned image refused with nothing stored, a `reject` scope
/// refused before any request.
#[tokio::test]
async fn signature_policy_is_checked_before_anything_is_stored() {
    use base64::Engine as _;
    use p256::ecdsa::signature::Signer as _;

    let reg = FakeRegistry::start().await;
    let host = reg.host();
    let key = p256::ecdsa::SigningKey::from_slice(&[5; 32]).unwrap();
    let pem = {
        use p256::pkcs8::EncodePublicKey as _;
        key.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap()
    };
    // A cosign signature manifest of `digest` as `repo`, with its payload blob pushed.
    let signature_manifest = |repo: &str, digest: &Digest| -> String {
        let payload = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"{host}/{repo}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
        );
        let signature: p256::ecdsa::Signature = key.sign(payload.as_bytes());
        let signature = base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes());
        let payload_digest = reg.put_blob(payload.as_bytes());
        let config = reg.put_blob(b"{}");
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{}",
                "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"{config}"}},
                "layers":[{{"mediaType":"{}","size":{},"digest":"{payload_digest}","annotations":{{"{}":"{signature}"}}}}]}}"#,
            crate::signature::COSIGN_SIGNATURE_ARTIFACT_TYPE,
            crate::signature::SIMPLE_SIGNING_MEDIA_TYPE,
            payload.len(),
            crate::signature::SIGNATURE_ANNOTATION,
        )
    };

    let host_arch = crate::platform::Platform::host().architecture;
    let (platform_manifest, config_digest) =
        push_image(&reg, "signed/multi", None, &[tar_with(&[("m", b"1")])], "", &host_arch);
    let index = push_index(&reg, "signed/multi", "1", &[(&format!("linux/{host_arch}"), platform_manifest)]);
    let referrer =
        reg.put_manifest("signed/multi", None, OCI_MANIFEST, signature_manifest("signed/multi", &index).as_bytes());
    let referrers = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{referrer}","size":1,"artifactType":"{}"}}]}}"#,
        crate::signature::COSIGN_SIGNATURE_ARTIFACT_TYPE
    );
    reg.state().referrers.insert(("signed/multi".into(), index.to_string()), referrers.into_bytes());

    let (tagged, _) = push_image(&reg, "signed/app", Some("1"), &[tar_with(&[("a", b"1")])], "", &host_arch);
    let sig = signature_manifest("signed/app", &tagged);
    reg.put_manifest("signed/app", Some(&format!("sha256-{}.sig", tagged.hex())), OCI_MANIFEST, sig.as_bytes());
    reg.state().fail.insert("/referrers/".into(), 100);

    let (unsigned, unsigned_config) =
        push_image(&reg, "signed/unsigned", Some("1"), &[tar_with(&[("u", b"1")])], "", &host_arch);

    let mut config = config_for(&reg);
    let policy = format!(
        "[scopes.\"{host}/signed\"]\npolicy = \"signed\"\nkey_data = [\"\"\"{pem}\"\"\"]\n[scopes.\"{host}/rejected\"]\npolicy = \"reject\"\n"
    );
    config.signatures = toml::from_str(&policy).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), config);

    // While the referrers API fails (503, transient for other requests), each pull asks it once
    // and then looks for the tags.
    let err = store.pull(&format!("{host}/signed/unsigned:1"), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains(&format!("scope \"{host}/signed\": no signature")), "{err}");
    assert_eq!(reg.hits(&format!("/referrers/{unsigned}")), 1, "the failing referrers API was retried");
    assert_eq!(layer_count(dir.path()), 0);
    assert!(fs::read_dir(dir.path().join("blobs/sha256")).map(|d| d.count() == 0).unwrap_or(true), "blobs were stored");
    assert!(tmp_is_empty(dir.path()));
    assert!(store.image(&unsigned_config.to_string()).unwrap().is_none());

    let image = store.pull(&format!("{host}/signed/app:1"), None).await.unwrap();
    assert_eq!(image.manifest_digest, tagged);

    reg.state().fail.clear();
    let image = store.pull(&format!("{host}/signed/multi:1"), None).await.unwrap();
    assert_eq!(image.id.0, config_digest, "the index's signature accepts its platform's image");

    let requests = reg.state().requests.len();
    let err = store.pull(&format!("{host}/rejected/app:1"), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("rejects every image"), "{err}");
    assert_eq!(reg.state().requests.len(), requests, "a rejected image was asked for");
}
