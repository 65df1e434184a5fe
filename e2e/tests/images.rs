//! The CRI ImageService end to end: the daemon runs as its systemd unit in a throwaway node and
//! pulls, over the node's loopback, from real registries (Debian's docker-registry) running in
//! the same node, images that the tests build themselves from busybox (see e2e/src/oci.rs) and
//! push there. What the daemon stored is then checked on disk, byte for byte against the source.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::crisimple::{container_config, create, pod, run_pod_sandbox, start};
use e2e::oci::{self, Compression, ConfigOptions, Image, LayerBuilder, listing_of_dir, listing_of_tar};
use e2e::rawgrpc::RawChannel;
use e2e::registry::{Proxy, Registry, RegistryOptions, node_pid1};
use e2e::{CriClient, Node, NodeOptions, cri, eventually};
use tonic::Code;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The image store in the node: `<state_root>/images`.
const STORE: &str = "/var/lib/cri-systemd/images";

// ---- the node and its daemon config ---------------------------------------------------------

/// `[images.registries."<host>"]` reached over plain HTTP, with mirrors.
fn plain_registry(host: &str, mirrors: &[&str]) -> String {
    let mirrors: Vec<String> = mirrors.iter().map(|m| format!("\"{m}\"")).collect();
    format!("[images.registries.\"{host}\"]\nplain_http = true\nmirrors = [{}]\n", mirrors.join(", "))
}

/// Boots a node whose daemon has `[images]` = `images` (top-level keys first, then tables).
/// One retry only: the tests that hit dead endpoints need not wait for the default four.
fn node_with(label: &str, images: &str, registries: &[String]) -> Node {
    let path = std::env::temp_dir().join(format!("cri-systemd-e2e-{label}-{}.toml", std::process::id()));
    std::fs::write(&path, format!("[images]\nretries = 1\n{images}\n{}", registries.concat())).unwrap();
    let node = Node::up(label, NodeOptions { config: Some(path.clone()), ..Default::default() });
    let _ = std::fs::remove_file(&path);
    node
}

/// The store as seen from the host (the node's /var/lib/cri-systemd is a host directory).
fn store(node: &Node) -> PathBuf {
    node.dir().join("state/images")
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    }
}

/// Chain ids (`sha256:<hex>`) of the unpacked layers in the store.
fn layer_dirs(node: &Node) -> BTreeSet<String> {
    names_in(&store(node).join("layers/sha256")).into_iter().map(|h| format!("sha256:{h}")).collect()
}

/// Digests of the blobs in the store.
fn blobs(node: &Node) -> BTreeSet<String> {
    names_in(&store(node).join("blobs/sha256")).into_iter().map(|h| format!("sha256:{h}")).collect()
}

fn tmp_entries(node: &Node) -> BTreeSet<String> {
    names_in(&store(node).join("tmp"))
}

/// No pull in progress leaves nothing half done: tmp/ is empty, every blob's content hashes to
/// its name, every layer directory holds exactly its `diff`.
fn assert_store_sound(node: &Node) {
    let root = store(node);
    assert_eq!(tmp_entries(node), BTreeSet::new(), "leftovers in {STORE}/tmp");
    // sha256sum in the node: hashing in this debug-built test would take seconds per 100 MB.
    let sums = node.sh(&format!("cd {STORE}/blobs/sha256 2>/dev/null && find . -type f -exec sha256sum {{}} + ; true"));
    for line in sums.lines() {
        let (sum, name) = line.split_once("  ./").unwrap_or_else(|| panic!("odd sha256sum line {line:?}"));
        assert_eq!(sum, name, "blob {name} does not hash to its name");
    }
    assert_eq!(sums.lines().count(), blobs(node).len(), "files other than blobs in {STORE}/blobs/sha256");
    for chain_id in layer_dirs(node) {
        let dir = root.join("layers/sha256").join(chain_id.strip_prefix("sha256:").unwrap());
        assert_eq!(names_in(&dir), BTreeSet::from(["diff".to_owned()]), "layer directory {}", dir.display());
    }
}

fn layer_diff(node: &Node, chain_id: &str) -> PathBuf {
    store(node).join("layers/sha256").join(chain_id.strip_prefix("sha256:").unwrap()).join("diff")
}

/// The daemon's default `images.layer_uid_shift`: layer files live in systemd's foreign range.
const LAYER_UID_SHIFT: u32 = 0x7FFE_0000;

/// The listing of a layer directory (or a stack of them) of the store, owners as in the images.
fn stored_listing(dir: &Path) -> oci::Listing {
    oci::unshifted(listing_of_dir(dir), LAYER_UID_SHIFT)
}

/// Every layer of `image` is unpacked exactly as its source tar says (content, modes, owners,
/// mtimes, link targets, hard link groups, whiteouts, opaque directories).
fn assert_layers_match_source(node: &Node, image: &Image) {
    for (i, (layer, chain_id)) in image.layers.iter().zip(image.chain_ids()).enumerate() {
        let dir = layer_diff(node, &chain_id);
        assert!(dir.is_dir(), "layer {i} ({}) is not unpacked at {}", layer.blob.digest, dir.display());
        assert_eq!(
            stored_listing(&dir),
            listing_of_tar(&layer.tar),
            "layer {i} ({}) differs from its source",
            layer.blob.digest
        );
    }
}

/// Mounts `chain_ids` (bottom first) read-only as an overlay in the node, as a container's
/// root file system stacks them; returns the mount point in the node and its path from the host.
fn mount_layers(node: &Node, tag: &str, chain_ids: &[String]) -> (String, PathBuf) {
    let dir = format!("/tmp/e2e-ovl-{tag}");
    let mut script = format!("set -e; mkdir -p {dir}/l {dir}/merged {dir}/empty; cd {dir}\n");
    for (i, chain_id) in chain_ids.iter().enumerate() {
        script.push_str(&format!(
            "ln -s {STORE}/layers/sha256/{}/diff l/{i}\n",
            chain_id.strip_prefix("sha256:").unwrap()
        ));
    }
    // Short relative lowerdirs (top first) keep 128 layers well inside a page of options.
    let mut lowers: Vec<String> = (0..chain_ids.len()).rev().map(|i| format!("l/{i}")).collect();
    if lowers.len() == 1 {
        lowers.push("empty".into());
    }
    script.push_str(&format!("mount -t overlay e2e-ovl -o lowerdir={} merged\n", lowers.join(":")));
    node.sh(&script);
    let merged = format!("{dir}/merged");
    let host = PathBuf::from(format!("/proc/{}/root{merged}", node_pid1(node)));
    (merged, host)
}

// ---- CRI calls ------------------------------------------------------------------------------

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec { image: image.into(), ..Default::default() })
}

async fn pull(client: &mut CriClient, image: &str, auth: Option<cri::AuthConfig>) -> Result<String, tonic::Status> {
    let request = cri::PullImageRequest { image: spec(image), auth, sandbox_config: None };
    client.image.pull_image(request).await.map(|r| r.into_inner().image_ref)
}

async fn status(client: &mut CriClient, image: &str) -> Option<cri::Image> {
    let request = cri::ImageStatusRequest { image: spec(image), verbose: false };
    let response = client.image.image_status(request).await.unwrap_or_else(|e| panic!("ImageStatus {image}: {e}"));
    response.into_inner().image
}

async fn list(client: &mut CriClient, filter: Option<&str>) -> Vec<cri::Image> {
    let filter = filter.map(|f| cri::ImageFilter { image: spec(f) });
    client.image.list_images(cri::ListImagesRequest { filter }).await.expect("ListImages").into_inner().images
}

async fn list_ids(client: &mut CriClient) -> BTreeSet<String> {
    list(client, None).await.into_iter().map(|i| i.id).collect()
}

async fn remove(client: &mut CriClient, image: &str) -> Result<(), tonic::Status> {
    client.image.remove_image(cri::RemoveImageRequest { image: spec(image) }).await.map(|_| ())
}

async fn fs_info(client: &mut CriClient) -> cri::FilesystemUsage {
    let info = client.image.image_fs_info(cri::ImageFsInfoRequest {}).await.expect("ImageFsInfo").into_inner();
    assert_eq!(info.image_filesystems.len(), 1, "{info:?}");
    info.image_filesystems[0].clone()
}

fn assert_error(result: Result<String, tonic::Status>, codes: &[Code], needles: &[&str]) -> tonic::Status {
    let status = match result {
        Ok(id) => panic!("expected an error ({codes:?}), got image {id}"),
        Err(status) => status,
    };
    assert!(codes.contains(&status.code()), "expected {codes:?}, got {status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "error message does not name {needle:?}: {}", status.message());
    }
    status
}

// ---- tests ----------------------------------------------------------------------------------

/// PullImage / ImageStatus / ListImages / RemoveImage / ImageFsInfo on one registry: ids, tags,
/// digests, sizes, the kubelet's user fields, one image under two names, pulls by digest.
#[tokio::test]
async fn pull_status_list_remove_and_fs_info() {
    let node = node_with("img-api", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let busybox = oci::busybox_image("");
    let tag = registry.push_image("e2e/busybox", "1", &busybox);
    let copy = registry.push_image("e2e/copy", "latest", &busybox);
    let users = [
        ("1002", Some(1002), ""),
        ("www-data", None, "www-data"),
        ("1003:1004", Some(1003), ""),
        ("www-data:1004", None, "www-data"),
    ];
    let user_images: Vec<(String, Image)> = users
        .iter()
        .enumerate()
        .map(|(i, (user, _, _))| {
            let image = oci::busybox_image(user);
            (registry.push_image("e2e/user", &format!("u{i}"), &image), image)
        })
        .collect();
    let by_digest_image = oci::busybox_image("65534");
    registry.push_image("e2e/bydigest", "unused", &by_digest_image);
    let by_digest = format!("{}@{}", registry.repo("e2e/bydigest"), by_digest_image.manifest.digest);

    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let fs_before = fs_info(&mut client).await;
    assert_eq!(fs_before.fs_id.as_ref().unwrap().mountpoint, STORE);

    // Absent: an answer without image, not an error.
    assert_eq!(status(&mut client, &tag).await, None);
    assert!(list(&mut client, None).await.is_empty());

    // Pull: the id is the config digest; status says everything about it.
    assert_eq!(pull(&mut client, &tag, None).await.expect("PullImage"), busybox.id());
    let image = status(&mut client, &tag).await.expect("pulled image has a status");
    assert_eq!(image.id, busybox.id());
    assert_eq!(image.repo_tags, vec![tag.clone()]);
    assert_eq!(image.repo_digests, vec![format!("{}@{}", registry.repo("e2e/busybox"), busybox.manifest.digest)]);
    assert_eq!(image.size, busybox.size());
    assert_eq!((image.uid, image.username.as_str()), (None, ""));
    assert_layers_match_source(&node, &busybox);
    // By id, with and without the algorithm, and by repo digest.
    for name in [busybox.id(), busybox.config.hex(), image.repo_digests[0].as_str()] {
        assert_eq!(status(&mut client, name).await.map(|i| i.id), Some(busybox.id().to_owned()), "status by {name}");
    }

    // The same image under a second name is one image with both names.
    assert_eq!(pull(&mut client, &copy, None).await.unwrap(), busybox.id());
    let image = status(&mut client, &copy).await.unwrap();
    assert_eq!(image.repo_tags, BTreeSet::from([tag.clone(), copy.clone()]).into_iter().collect::<Vec<_>>());
    assert_eq!(image.repo_digests.len(), 2, "{:?}", image.repo_digests);
    assert_eq!(list(&mut client, None).await.len(), 1);

    // The image config's USER as kubelet reads it: uid if numeric, else username.
    for ((reference, image), (user, uid, username)) in user_images.iter().zip(users) {
        assert_eq!(pull(&mut client, reference, None).await.unwrap(), image.id());
        let status = status(&mut client, reference).await.unwrap();
        assert_eq!(status.uid.map(|u| u.value), uid, "uid for USER {user}");
        assert_eq!(status.username, username, "username for USER {user}");
    }

    // By digest: no tag, exactly that repo digest.
    assert_eq!(pull(&mut client, &by_digest, None).await.unwrap(), by_digest_image.id());
    let image = status(&mut client, &by_digest).await.unwrap();
    assert_eq!(image.repo_tags, Vec::<String>::new());
    assert_eq!(image.repo_digests, vec![by_digest.clone()]);

    // Listing, with and without a filter.
    let mut all: BTreeSet<String> = user_images.iter().map(|(_, i)| i.id().to_owned()).collect();
    all.extend([busybox.id().to_owned(), by_digest_image.id().to_owned()]);
    assert_eq!(all.len(), 6);
    assert_eq!(list_ids(&mut client).await, all);
    let filtered = list(&mut client, Some(&user_images[1].0)).await;
    assert_eq!(filtered.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec![user_images[1].1.id()]);
    assert_eq!(filtered[0].username, "www-data");
    assert!(list(&mut client, Some(&registry.repo("e2e/nothing:1"))).await.is_empty());

    // The store grew by at least the unpacked busybox and its blob.
    let fs_after = fs_info(&mut client).await;
    let busybox_len = oci::busybox_binary().len() as u64;
    assert!(
        fs_after.used_bytes.unwrap().value >= fs_before.used_bytes.unwrap().value + busybox_len,
        "{fs_before:?} -> {fs_after:?}"
    );
    assert!(
        fs_after.inodes_used.unwrap().value > fs_before.inodes_used.unwrap().value + 10,
        "{fs_before:?} -> {fs_after:?}"
    );
    assert!(fs_after.timestamp > 0);

    // Removing by one tag removes the image with all its names.
    remove(&mut client, &copy).await.expect("RemoveImage by tag");
    assert_eq!(status(&mut client, &tag).await, None);
    assert_eq!(status(&mut client, busybox.id()).await, None);
    all.remove(busybox.id());
    assert_eq!(list_ids(&mut client).await, all);
    // Other images sharing its layer are untouched; what only it used is collected.
    for (reference, image) in &user_images {
        assert_eq!(status(&mut client, reference).await.map(|i| i.id), Some(image.id().to_owned()));
    }
    let stored = blobs(&node);
    assert!(!stored.contains(busybox.id()) && !stored.contains(&busybox.manifest.digest), "{stored:?}");
    assert!(layer_dirs(&node).contains(&busybox.chain_ids()[0]));

    // By repo digest, and by id (with and without `sha256:`).
    let repo_digest = format!("{}@{}", registry.repo("e2e/busybox"), busybox.manifest.digest);
    for name in [repo_digest.as_str(), busybox.id(), busybox.config.hex()] {
        assert_eq!(pull(&mut client, &tag, None).await.unwrap(), busybox.id());
        remove(&mut client, name).await.unwrap_or_else(|e| panic!("RemoveImage {name}: {e}"));
        assert_eq!(status(&mut client, &tag).await, None, "still there after removing {name}");
    }

    // Removing what is not there succeeds.
    for name in [tag.as_str(), busybox.id(), registry.repo("e2e/never:1").as_str()] {
        remove(&mut client, name).await.unwrap_or_else(|e| panic!("RemoveImage of absent {name}: {e}"));
    }
    assert_eq!(list_ids(&mut client).await, all);
    assert_store_sound(&node);

    // Removing every image leaves an empty store.
    for id in &all {
        remove(&mut client, id).await.unwrap();
    }
    assert!(list(&mut client, None).await.is_empty());
    assert_eq!((blobs(&node), layer_dirs(&node)), Default::default());
    let fs_empty = fs_info(&mut client).await;
    assert!(
        fs_empty.used_bytes.unwrap().value + busybox_len <= fs_after.used_bytes.unwrap().value,
        "{fs_after:?} -> {fs_empty:?}"
    );
    assert_store_sound(&node);
}

/// A three-layer image (gzip, zstd, plain; whiteouts, an opaque directory, hard links, a fifo)
/// is unpacked byte for byte as its source tars, and its layers stack to the expected tree; from
/// a multi-platform index only the host's image is fetched and unpacked.
#[tokio::test]
async fn unpacked_layers_match_their_source_byte_for_byte() {
    let node = node_with("img-content", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let layered = oci::layered_image();
    let reference = registry.push_image("e2e/layered", "1", &layered);
    let index = oci::platform_index();
    let multi = registry.push_index("e2e/multiarch", "1", &index);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    assert_eq!(pull(&mut client, &reference, None).await.expect("PullImage"), layered.id());
    let image = status(&mut client, &reference).await.unwrap();
    assert_eq!(image.uid.map(|u| u.value), Some(1003));
    assert_eq!(image.size, layered.size());
    assert_layers_match_source(&node, &layered);
    // Blobs are kept: the config, the manifest and each compressed layer.
    let stored = blobs(&node);
    for digest in [layered.id(), &layered.manifest.digest]
        .into_iter()
        .chain(layered.layers.iter().map(|l| l.blob.digest.as_str()))
    {
        assert!(stored.contains(digest), "blob {digest} not in the store: {stored:?}");
    }

    // Stacked as a container's root file system would be.
    let (merged, host) = mount_layers(&node, "layered", &layered.chain_ids());
    let sources: Vec<_> = layered.layers.iter().map(|l| listing_of_tar(&l.tar)).collect();
    let expected = oci::merged_listing(&sources);
    assert!(
        !expected.contains_key("etc/remove-me")
            && !expected.contains_key("var/cache/old/a")
            && !expected.contains_key("opt/keep")
    );
    assert_eq!(stored_listing(&host), expected, "the stacked layers differ from the source");
    assert_eq!(node.sh(&format!("cat {merged}/etc/passwd | wc -l")).trim(), "2");
    assert_eq!(node.sh(&format!("{merged}/bin/busybox echo runs")).trim(), "runs");
    node.sh(&format!("umount {merged}"));

    // The index: the host's platform only, recorded under the index digest.
    let host_arch = oci::host_architecture();
    let native = index.images.iter().find(|i| i.architecture == host_arch).unwrap();
    assert_eq!(pull(&mut client, &multi, None).await.unwrap(), native.id());
    let image = status(&mut client, &multi).await.unwrap();
    assert_eq!(image.repo_tags, vec![multi.clone()]);
    assert_eq!(image.repo_digests, vec![format!("{}@{}", registry.repo("e2e/multiarch"), index.manifest.digest)]);
    assert_layers_match_source(&node, native);
    let native_chain = &native.chain_ids()[0];
    assert_eq!(
        std::fs::read_to_string(layer_diff(&node, native_chain).join("platform")).unwrap(),
        format!("{host_arch}\n")
    );
    for other in index.images.iter().filter(|i| i.architecture != host_arch) {
        for digest in [other.id(), &other.layers[0].blob.digest, &other.manifest.digest] {
            let fetched = registry.access_lines(digest);
            assert!(fetched.is_empty(), "{} content {digest} was fetched: {fetched:?}", other.architecture);
            assert!(!blobs(&node).contains(digest));
        }
        assert!(!layer_dirs(&node).contains(&other.chain_ids()[0]));
    }
    assert_store_sound(&node);
}

/// 128 layers (busybox and 127 small ones) pull, stack to the expected tree in one overlay
/// mount, and make the root file system of a container that the daemon runs.
#[tokio::test]
async fn a_128_layer_image_pulls_and_runs() {
    let node = node_with("img-deep", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let image = oci::many_layers_image(128);
    let reference = registry.push_image("e2e/deep", "128", &image);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    let started = Instant::now();
    assert_eq!(pull(&mut client, &reference, None).await.expect("PullImage"), image.id());
    eprintln!("128-layer pull took {:?}", started.elapsed());
    let verbose = client
        .image
        .image_status(cri::ImageStatusRequest { image: spec(&reference), verbose: true })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).expect("verbose info is JSON");
    assert_eq!(info["layers"].as_array().map(Vec::len), Some(128), "{info}");
    assert_eq!(layer_dirs(&node), image.chain_ids().into_iter().collect());
    assert_layers_match_source(&node, &image);

    let (merged, host) = mount_layers(&node, "deep", &image.chain_ids());
    let sources: Vec<_> = image.layers.iter().map(|l| listing_of_tar(&l.tar)).collect();
    assert_eq!(stored_listing(&host), oci::merged_listing(&sources));
    assert_eq!(std::fs::read_to_string(host.join("top")).unwrap(), "127\n");
    node.sh(&format!("umount {merged}"));

    // The daemon's own rootfs assembly (imagestore's Rootfs) for a container of the image.
    let check = "test \"$(cat /top)\" = 127 && test \"$(ls /layers | wc -l)\" = 127 && test -x /bin/busybox && echo ok > /written";
    let exit = run_container(&mut client, "deep", &reference, &["/bin/busybox", "sh", "-c", check]).await;
    assert_eq!(exit.exit_code, 0, "the container did not see the 128 layers stacked: {exit:?}\n{}", node.logs());
    assert_store_sound(&node);
}

/// Runs `command` in a new container of `image` in a new pod, and returns its status once it
/// exited.
async fn run_container(client: &mut CriClient, name: &str, image: &str, command: &[&str]) -> cri::ContainerStatus {
    let pod_config = e2e::crisimple::pod_config(name);
    let pod = e2e::crisimple::run_pod_sandbox(client, pod_config.clone()).await.expect("RunPodSandbox");
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: spec(image),
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let request =
        cri::CreateContainerRequest { pod_sandbox_id: pod, config: Some(config), sandbox_config: Some(pod_config) };
    let id = client.runtime.create_container(request).await.expect("CreateContainer").into_inner().container_id;
    client
        .runtime
        .start_container(cri::StartContainerRequest { container_id: id.clone() })
        .await
        .expect("StartContainer");
    eventually(Duration::from_secs(30), "the container to exit", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let request = cri::ContainerStatusRequest { container_id: id, verbose: false };
            let status =
                client.runtime.container_status(request).await.expect("ContainerStatus").into_inner().status.unwrap();
            (status.state == cri::ContainerState::ContainerExited as i32).then_some(status)
        }
    })
    .await
}

/// Basic auth (none, wrong and right credentials, docker's `auth` field), mirrors in order with
/// fallback to the next endpoint, and registries that cannot be reached.
#[tokio::test]
async fn credentials_mirrors_and_unreachable_registries() {
    let node = node_with(
        "img-auth",
        "",
        &[
            plain_registry("127.0.0.1:5001", &[]),
            // 5003 has no registry at all: only its mirrors (a dead one, then 5002) serve it.
            plain_registry("127.0.0.1:5003", &["http://127.0.0.1:5009", "http://127.0.0.1:5002"]),
            // 5000 is a registry with a mirror in front.
            plain_registry("127.0.0.1:5000", &["http://127.0.0.1:5002"]),
            plain_registry("127.0.0.1:5009", &[]),
        ],
    );
    let (user, password) = ("e2e-user", "e2e-Passw0rd");
    let private =
        Registry::start(&node, "auth", 5001, RegistryOptions { basic_auth: Some((user.into(), password.into())) });
    let mirror = Registry::start(&node, "mirror", 5002, RegistryOptions::default());
    let origin = Registry::start(&node, "origin", 5000, RegistryOptions::default());
    let secret = oci::busybox_image("1002");
    let reference = private.push_image("e2e/private", "1", &secret);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    // The registry itself refuses anonymous access, as the test expects of it.
    let anonymous = e2e::registry::http(&node, &private.host(), "GET", "/v2/", &[], b"").unwrap();
    assert_eq!(anonymous.status, 401);

    let basic = |user: &str, password: &str| cri::AuthConfig {
        username: user.into(),
        password: password.into(),
        ..Default::default()
    };
    assert_error(
        pull(&mut client, &reference, None).await,
        &[Code::Unauthenticated, Code::PermissionDenied],
        &["127.0.0.1:5001"],
    );
    assert_error(
        pull(&mut client, &reference, Some(basic(user, "wrong"))).await,
        &[Code::Unauthenticated, Code::PermissionDenied],
        &["127.0.0.1:5001"],
    );
    assert_error(
        pull(&mut client, &reference, Some(basic("nobody", password))).await,
        &[Code::Unauthenticated, Code::PermissionDenied],
        &[],
    );
    assert!(list(&mut client, None).await.is_empty());
    assert_eq!(
        pull(&mut client, &reference, Some(basic(user, password))).await.expect("pull with credentials"),
        secret.id()
    );
    remove(&mut client, &reference).await.unwrap();
    use base64::Engine as _;
    let docker_auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let auth = cri::AuthConfig { auth: docker_auth, ..Default::default() };
    assert_eq!(pull(&mut client, &reference, Some(auth)).await.expect("pull with docker auth"), secret.id());

    // A registry served by its mirrors only: the dead first mirror is skipped.
    let mirrored = oci::busybox_image("www-data");
    mirror.push_image("e2e/mirrored", "1", &mirrored);
    let via_mirror = "127.0.0.1:5003/e2e/mirrored:1";
    assert_eq!(pull(&mut client, via_mirror, None).await.expect("pull through the mirror"), mirrored.id());
    let image = status(&mut client, via_mirror).await.unwrap();
    assert_eq!(image.repo_tags, vec![via_mirror.to_owned()]);
    assert_eq!(image.repo_digests, vec![format!("127.0.0.1:5003/e2e/mirrored@{}", mirrored.manifest.digest)]);
    let asked = mirror.access_lines("/v2/e2e/mirrored/manifests/1");
    assert!(!asked.is_empty(), "the mirror was not asked:\n{}", mirror.logs());
    assert!(
        asked.iter().all(|l| l.contains("ns=127.0.0.1:5003") || l.contains("ns=127.0.0.1%3A5003")),
        "no ns= parameter: {asked:?}"
    );

    // The mirror is preferred; what it lacks comes from the registry itself.
    let (on_mirror, on_origin) = (oci::busybox_image("1003:1004"), oci::busybox_image("www-data:1004"));
    mirror.push_image("e2e/both", "1", &on_mirror);
    origin.push_image("e2e/both", "1", &on_origin);
    assert_eq!(pull(&mut client, &origin.repo("e2e/both:1"), None).await.unwrap(), on_mirror.id());
    let only_origin = oci::busybox_image("7");
    let reference = origin.push_image("e2e/origin-only", "1", &only_origin);
    assert_eq!(pull(&mut client, &reference, None).await.expect("fallback to the registry"), only_origin.id());
    assert!(!mirror.access_lines("/v2/e2e/origin-only/manifests/1").is_empty(), "the mirror was not tried first");

    // Nothing listening: Unavailable, naming the registry, and nothing stored.
    let before = (list_ids(&mut client).await, blobs(&node), layer_dirs(&node));
    let dead = "127.0.0.1:5009/e2e/nothing:1";
    assert_error(pull(&mut client, dead, None).await, &[Code::Unavailable], &["127.0.0.1:5009"]);
    // A live registry without the image: NotFound.
    assert_error(pull(&mut client, &origin.repo("e2e/nothing:1"), None).await, &[Code::NotFound], &["e2e/nothing"]);
    // A registry that goes away.
    origin.stop();
    mirror.stop();
    assert_error(
        pull(&mut client, &origin.repo("e2e/origin-only:2"), None).await,
        &[Code::Unavailable],
        &["127.0.0.1:5000"],
    );
    assert_eq!((list_ids(&mut client).await, blobs(&node), layer_dirs(&node)), before);
    assert_store_sound(&node);
}

/// Registry credentials are never sent to a mirror over plain HTTP (issue 11, item 8), where
/// anyone on the way would read them: the registry's mirror here is a recording proxy in front of
/// the registry itself, so a daemon that answered the mirror's 401 with the pull's credentials
/// would pull through it. The mirror is asked first and sees no `Authorization` header; the pull
/// succeeds from the registry itself (plain HTTP too, but asked for by name), which refuses
/// anonymous pulls.
#[tokio::test]
async fn credentials_never_reach_a_plain_http_mirror() {
    let node = node_with("img-mirror-creds", "", &[plain_registry("127.0.0.1:5001", &["http://127.0.0.1:5002"])]);
    let (user, password) = ("e2e-user", "e2e-Mirr0r-Secret");
    let private =
        Registry::start(&node, "auth", 5001, RegistryOptions { basic_auth: Some((user.into(), password.into())) });
    let mirror = Proxy::start(&node, 5002, &private.host());
    let image = oci::busybox_image("");
    let reference = private.push_image("e2e/private", "1", &image);
    let mut client = node.cri(ANSWER_TIMEOUT).await;

    let auth = cri::AuthConfig { username: user.into(), password: password.into(), ..Default::default() };
    assert_eq!(pull(&mut client, &reference, Some(auth)).await.expect("pull with credentials"), image.id());
    let asked = mirror.requests();
    assert!(asked.contains("/v2/e2e/private/manifests/1"), "the mirror was not asked first:\n{asked}");
    let sent: Vec<&str> = asked.lines().filter(|l| l.to_ascii_lowercase().starts_with("authorization:")).collect();
    assert!(sent.is_empty(), "credentials went to the plain-HTTP mirror: {sent:?}");
    assert!(!asked.contains(password));
}

/// Layers that try to write outside their directory, a decompression bomb, and corrupt layers
/// are refused with an error naming the layer (and the entry), and leave nothing behind: not
/// outside the store, not in it.
#[tokio::test]
async fn hostile_and_corrupt_layers_are_refused_and_leave_nothing() {
    const LIMIT: u64 = 16 << 20;
    let node =
        node_with("img-hostile", &format!("max_layer_bytes = {LIMIT}"), &[plain_registry("127.0.0.1:5000", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let passwd_before = node.sh("stat -c '%h %s %Y' /etc/passwd; sha256sum /etc/passwd");

    type Build = fn(&mut LayerBuilder);
    let cases: Vec<(&str, Build, &str, Code)> = vec![
        (
            "dotdot",
            |l| {
                l.file("../../../../../../../../../../../../tmp/e2e-escape-dotdot", 0o644, b"x");
            },
            "../../../../../../../../../../../../tmp/e2e-escape-dotdot",
            Code::FailedPrecondition,
        ),
        (
            "dotdot-inner",
            |l| {
                l.dir("a", 0o755).file("a/../../e2e-escape-dotdot-inner", 0o644, b"x");
            },
            "a/../../e2e-escape-dotdot-inner",
            Code::FailedPrecondition,
        ),
        (
            "symlink-abs",
            |l| {
                l.symlink("evil", "/tmp").file("evil/e2e-escape-symlink", 0o644, b"x");
            },
            "evil/e2e-escape-symlink",
            Code::FailedPrecondition,
        ),
        (
            "symlink-rel",
            |l| {
                l.symlink("evil", "../../../../../../../../tmp").file("evil/e2e-escape-symlink-rel", 0o644, b"x");
            },
            "evil/e2e-escape-symlink-rel",
            Code::FailedPrecondition,
        ),
        (
            "symlink-deep",
            |l| {
                l.dir("d", 0o755)
                    .symlink("d/up", "../../../../../../../../etc")
                    .dir("d/up/e2e-escape-symlink-dir", 0o755);
            },
            "d/up/e2e-escape-symlink-dir",
            Code::FailedPrecondition,
        ),
        (
            "hardlink-dotdot",
            |l| {
                l.hardlink("e2e-escape-hardlink", "../../../../../../../../etc/passwd");
            },
            "e2e-escape-hardlink",
            Code::FailedPrecondition,
        ),
        (
            "hardlink-abs",
            |l| {
                l.hardlink("e2e-escape-hardlink-abs", "/etc/passwd");
            },
            "e2e-escape-hardlink-abs",
            Code::FailedPrecondition,
        ),
        (
            "hardlink-via-symlink",
            |l| {
                l.symlink("etc-link", "/etc").hardlink("e2e-escape-hardlink-sym", "etc-link/passwd");
            },
            "e2e-escape-hardlink-sym",
            Code::FailedPrecondition,
        ),
        (
            "bomb",
            |l| {
                l.file("e2e-bomb", 0o644, &vec![0; (LIMIT + (4 << 20)) as usize]);
            },
            "e2e-bomb",
            Code::ResourceExhausted,
        ),
    ];
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    for (name, build, entry, code) in cases {
        let mut builder = LayerBuilder::new();
        // A harmless entry first, so that the refusal comes mid-layer, after writing began.
        builder.dir("ok", 0o755).file("ok/file", 0o644, b"fine\n");
        build(&mut builder);
        let compression = if name == "bomb" { Compression::Zstd } else { Compression::Gzip };
        let image = Image::new(vec![builder.build(compression)], ConfigOptions::default());
        if name == "bomb" {
            assert!(image.layers[0].blob.data.len() < 1 << 20, "the bomb is small when compressed");
        }
        let reference = registry.push_image("e2e/hostile", name, &image);
        let layer = &image.layers[0].blob.digest;
        let status = assert_error(pull(&mut client, &reference, None).await, &[code], &[layer.as_str(), entry]);
        eprintln!("{name}: {}", status.message());
        if name == "bomb" {
            assert!(status.message().contains("max_layer_bytes"), "{}", status.message());
        }
        assert_eq!(status_of(&mut client, &reference).await, None, "{name}");
        assert!(!layer_dirs(&node).contains(&image.chain_ids()[0]), "{name}: the refused layer is in the store");
        assert!(!blobs(&node).contains(layer.as_str()), "{name}: the refused layer's blob is in the store");
        assert_store_sound(&node);
    }

    // Absolute names are taken relative to the layer root (as containerd does): confined.
    let mut builder = LayerBuilder::new();
    builder.dir("/tmp", 0o1777).file("/tmp/e2e-escape-absolute", 0o644, b"inside\n");
    let absolute = Image::new(vec![builder.build(Compression::Gzip)], ConfigOptions::default());
    let reference = registry.push_image("e2e/hostile", "absolute", &absolute);
    assert_eq!(pull(&mut client, &reference, None).await.expect("absolute names are confined"), absolute.id());
    let diff = layer_diff(&node, &absolute.chain_ids()[0]);
    assert_eq!(std::fs::read_to_string(diff.join("tmp/e2e-escape-absolute")).unwrap(), "inside\n");

    // A symlink planted by one layer does not redirect the next layer's writes.
    let mut lower = LayerBuilder::new();
    lower.symlink("evil", "/tmp");
    let mut upper = LayerBuilder::new();
    upper.dir("evil", 0o755).file("evil/e2e-escape-crosslayer", 0o644, b"inside\n");
    let cross =
        Image::new(vec![lower.build(Compression::Gzip), upper.build(Compression::Gzip)], ConfigOptions::default());
    let reference = registry.push_image("e2e/hostile", "crosslayer", &cross);
    assert_eq!(
        pull(&mut client, &reference, None).await.expect("a later layer's directory replaces the symlink"),
        cross.id()
    );
    assert_layers_match_source(&node, &cross);

    // Corrupt: the registry serves other bytes than the digest says (same size).
    let mut builder = LayerBuilder::new();
    builder.file("payload", 0o644, &oci::pseudo_random(3, 64 << 10));
    let tampered = Image::new(vec![builder.build(Compression::None)], ConfigOptions::default());
    let reference = registry.push_image("e2e/corrupt", "tampered", &tampered);
    let mut bytes = tampered.layers[0].blob.data.clone();
    bytes[1024] ^= 0xff; // inside the file's content: still a valid tar
    registry.tamper_blob(&tampered.layers[0].blob.digest, &bytes);
    let status = assert_error(
        pull(&mut client, &reference, None).await,
        &[Code::FailedPrecondition],
        &[&tampered.layers[0].blob.digest],
    );
    assert!(status.message().contains("digest"), "{}", status.message());
    assert!(!layer_dirs(&node).contains(&tampered.chain_ids()[0]));
    assert!(!blobs(&node).contains(&tampered.layers[0].blob.digest));

    // Corrupt: the config's diff_id does not match the layer.
    let mut builder = LayerBuilder::new();
    builder.file("payload", 0o644, b"real content\n");
    let wrong = ConfigOptions { diff_ids: Some(vec![oci::sha256(b"another tar")]), ..Default::default() };
    let mismatched = Image::new(vec![builder.build(Compression::Gzip)], wrong);
    let reference = registry.push_image("e2e/corrupt", "diffid", &mismatched);
    let status = assert_error(
        pull(&mut client, &reference, None).await,
        &[Code::FailedPrecondition],
        &[&mismatched.layers[0].blob.digest],
    );
    assert!(status.message().contains("diff_id"), "{}", status.message());
    assert!(!layer_dirs(&node).contains(&mismatched.chain_ids()[0]));
    assert_eq!(list_ids(&mut client).await, BTreeSet::from([absolute.id().to_owned(), cross.id().to_owned()]));
    assert_store_sound(&node);

    // Nothing escaped: not in the usual targets, not anywhere in the state root outside the
    // layer directories, and the node's /etc/passwd is untouched (no new hard link to it).
    let escaped = node.sh(&format!(
        "ls -d /e2e-escape-* /tmp/e2e-escape-* /etc/e2e-escape-* /root/e2e-escape-* /var/lib/e2e-escape-* 2>/dev/null; \
         find /var/lib/cri-systemd /run/cri-systemd -name 'e2e-escape-*' -not -path '{STORE}/layers/sha256/*/diff/*'; true"
    ));
    assert_eq!(escaped.trim(), "", "files written outside the layers");
    assert_eq!(node.sh("stat -c '%h %s %Y' /etc/passwd; sha256sum /etc/passwd"), passwd_before);
}

async fn status_of(client: &mut CriClient, image: &str) -> Option<String> {
    status(client, image).await.map(|i| i.id)
}

/// Interrupted pulls leave nothing behind: a 1 ms deadline, a deadline that expires mid-pull,
/// and a daemon killed with SIGKILL mid-pull; afterwards the same pull succeeds and the store
/// holds exactly the image, byte for byte. The registry is reached through a proxy that sends
/// 12 MiB/s, so that the 24 MiB pull takes two seconds however fast the daemon is.
#[tokio::test]
async fn interrupted_pulls_leave_nothing_behind() {
    let node = node_with("img-interrupt", "", &[plain_registry("127.0.0.1:5100", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let proxy = Proxy::throttled(&node, 5100, &registry.host(), 12 << 20);
    let big = oci::big_image(1, 3, 8 << 20);
    registry.push_image("e2e/big", "1", &big);
    let reference = format!("{}/e2e/big:1", proxy.host());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let raw = RawChannel::connect(&node.socket()).await.unwrap();

    // 1 ms: DeadlineExceeded from the daemon, which did not even ask the registry.
    let mut request = tonic::Request::new(cri::PullImageRequest { image: spec(&reference), ..Default::default() });
    request.set_timeout(Duration::from_millis(1));
    let status = raw.image().pull_image(request).await.expect_err("a 1 ms pull");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(registry.access_lines("/v2/e2e/big/"), Vec::<String>::new());
    assert_eq!(status_of(&mut client, &reference).await, None);
    assert_eq!((blobs(&node), layer_dirs(&node), tmp_entries(&node)), Default::default());

    // A deadline that expires while the layers are downloading.
    let deadline = Duration::from_millis(1000);
    let mut request = tonic::Request::new(cri::PullImageRequest { image: spec(&reference), ..Default::default() });
    request.set_timeout(deadline);
    let started = Instant::now();
    let status = raw.image().pull_image(request).await.expect_err("the pull must outlast the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < deadline + Duration::from_millis(500), "answered after {:?}", started.elapsed());
    assert!(!registry.access_lines("\"GET /v2/e2e/big/blobs/").is_empty(), "the pull never reached the layers");
    eventually(Duration::from_secs(10), "the cancelled pull to clean up tmp/", || {
        let empty = tmp_entries(&node).is_empty();
        async move { empty.then_some(()) }
    })
    .await;
    assert_eq!(status_of(&mut client, &reference).await, None);
    assert!(
        !layer_dirs(&node).is_superset(&big.chain_ids().into_iter().collect()),
        "the whole image arrived within the deadline"
    );
    assert_store_sound(&node);
    let kept_after_deadline = layer_dirs(&node);

    // SIGKILL while a layer is being unpacked.
    let pulling = {
        let mut client = client.clone();
        let reference = reference.clone();
        tokio::spawn(async move { pull(&mut client, &reference, None).await })
    };
    let tmp = store(&node).join("tmp");
    let partial = eventually(Duration::from_secs(30), "a layer being unpacked in tmp/", || {
        let found = partial_layer_file(&tmp);
        async move { found }
    })
    .await;
    node.sh("systemctl kill -s KILL cri-systemd");
    let result = pulling.await.unwrap();
    assert!(result.is_err(), "the pull finished before the kill: {result:?}");
    assert!(!tmp_entries(&node).is_empty(), "the killed daemon had a partial layer ({}) in tmp/", partial.display());
    let mut client = node.cri(ANSWER_TIMEOUT).await; // systemd restarts it (Restart=always)
    assert_eq!(tmp_entries(&node), BTreeSet::new(), "the restarted daemon did not clear tmp/");
    assert_eq!(status_of(&mut client, &reference).await, None, "a killed pull is visible");
    assert_store_sound(&node);
    assert!(layer_dirs(&node).is_superset(&kept_after_deadline));

    // Pull again: the image, complete, and nothing else.
    assert_eq!(pull(&mut client, &reference, None).await.expect("pull after the kill"), big.id());
    assert_store_sound(&node);
    assert_eq!(layer_dirs(&node), big.chain_ids().into_iter().collect());
    let mut expected_blobs: BTreeSet<String> = big.layers.iter().map(|l| l.blob.digest.clone()).collect();
    expected_blobs.extend([big.id().to_owned(), big.manifest.digest.clone()]);
    assert_eq!(blobs(&node), expected_blobs);
    assert_layers_match_source(&node, &big);
}

/// A file being written in a staged layer under tmp/, if any.
fn partial_layer_file(tmp: &Path) -> Option<PathBuf> {
    for staged in std::fs::read_dir(tmp).ok()? {
        let diff = staged.ok()?.path().join("diff");
        for file in std::fs::read_dir(&diff).into_iter().flatten().flatten() {
            if file.metadata().is_ok_and(|m| m.len() > 0) {
                return Some(file.path());
            }
        }
    }
    None
}

/// Two pulls of one image at once (through a 8 MiB/s proxy, so that they overlap for sure):
/// both succeed with the same id, and each blob is downloaded from the registry exactly once.
#[tokio::test]
async fn concurrent_pulls_download_each_blob_once() {
    let node = node_with("img-concurrent", "", &[plain_registry("127.0.0.1:5100", &[])]);
    let registry = Registry::start(&node, "main", 5000, RegistryOptions::default());
    let proxy = Proxy::throttled(&node, 5100, &registry.host(), 8 << 20);
    let image = oci::big_image(2, 3, 4 << 20);
    registry.push_image("e2e/shared", "1", &image);
    let reference = format!("{}/e2e/shared:1", proxy.host());
    let (mut a, mut b) = (node.cri(ANSWER_TIMEOUT).await, node.cri(ANSWER_TIMEOUT).await);

    let (ra, rb) = tokio::join!(pull(&mut a, &reference, None), pull(&mut b, &reference, None));
    assert_eq!(ra.expect("first pull"), image.id());
    assert_eq!(rb.expect("second pull"), image.id());
    // They overlapped: the daemon started both before it finished either.
    let logs = node.logs();
    let first_done = logs.find("pulled image").unwrap_or_else(|| panic!("no 'pulled image' in the journal:\n{logs}"));
    assert_eq!(logs[..first_done].matches("pulling image").count(), 2, "the pulls did not overlap:\n{logs}");
    // Both asked for the manifest, and every blob came over the wire once.
    let manifests = registry.access_lines("\"GET /v2/e2e/shared/manifests/1");
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    for blob in image.layers.iter().map(|l| &l.blob).chain([&image.config]) {
        assert_eq!(
            registry.blob_downloads("e2e/shared", &blob.digest),
            1,
            "downloads of {}:\n{}",
            blob.digest,
            registry.logs()
        );
    }
    assert_eq!(list(&mut a, None).await.len(), 1);
    assert_store_sound(&node);
    assert_layers_match_source(&node, &image);
}

// ---- images and the containers that use them ------------------------------------------------

/// A node with the registry and busybox pushed and pulled; returns (client, image reference).
async fn node_with_busybox(node: &Node) -> (CriClient, String, Image) {
    let registry = Registry::start(node, "main", 5000, RegistryOptions::default());
    let busybox = oci::busybox_image("");
    let reference = registry.push_image("e2e/busybox", "1", &busybox);
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    assert_eq!(pull(&mut client, &reference, None).await.expect("PullImage"), busybox.id());
    (client, reference, busybox)
}

/// RemovePodSandbox removes its containers as RemoveContainer does: the daemon keeps no file of
/// theirs open (their CRI logs), and an image removed while they used it is collected with them.
#[tokio::test]
async fn removing_a_pod_forgets_its_containers_logs_and_collects_their_removed_image() {
    let node = node_with("img-podgc", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let (mut client, reference, busybox) = node_with_busybox(&node).await;
    let pod = run_pod_sandbox(&mut client, pod("podgc").log_directory("/var/log/pods/e2e_podgc"))
        .await
        .expect("RunPodSandbox");
    let ticker = ["/bin/busybox", "sh", "-c", "while :; do echo tick; /bin/busybox sleep 0.1; done"];
    let mut config = container_config("ticker", &reference, &ticker);
    config.log_path = "ticker/0.log".into();
    let id = create(&mut client, &pod, config).await.expect("CreateContainer");
    start(&mut client, &id).await.expect("StartContainer");
    let log = "/var/log/pods/e2e_podgc/ticker/0.log";
    eventually(Duration::from_secs(20), "ticks in the container's log", || {
        let text = node.exec(&["cat", log]).stdout;
        async move { text.contains("tick").then_some(()) }
    })
    .await;

    // Removed while the container uses it: gone from the list, its content kept.
    remove(&mut client, &reference).await.expect("RemoveImage");
    assert_eq!(status(&mut client, &reference).await, None);
    assert!(layer_dirs(&node).contains(&busybox.chain_ids()[0]), "the used image's layer was collected");

    client
        .runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .expect("StopPodSandbox");
    client
        .runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod })
        .await
        .expect("RemovePodSandbox");
    let open = node.sh("ls -l /proc/$(systemctl show -p MainPID --value cri-systemd)/fd/");
    assert!(!open.contains(log), "the daemon still holds the removed container's log open:\n{open}");
    assert_eq!(
        (blobs(&node), layer_dirs(&node)),
        Default::default(),
        "the removed image outlived the pod whose container kept it"
    );
    assert_store_sound(&node);
}

/// A container record whose image id does not parse as a digest (a record written by hand or by
/// another version) still keeps the layers the container mounts: collection never deletes them.
#[tokio::test]
async fn layers_of_a_container_whose_image_id_does_not_parse_are_kept() {
    let node = node_with("img-badid", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let (mut client, reference, busybox) = node_with_busybox(&node).await;
    let pod = e2e::crisimple::run_pod(&mut client, "badid").await;
    let config = container_config("sleeper", &reference, &["/bin/busybox", "sleep", "100000"]);
    let id = create(&mut client, &pod, config).await.expect("CreateContainer");
    remove(&mut client, &reference).await.expect("RemoveImage");
    assert!(layer_dirs(&node).contains(&busybox.chain_ids()[0]), "the used image's layer was collected");

    // The record as another version might have written it: the image id is not a digest.
    let record = format!("/var/lib/cri-systemd/containers/{id}/container.json");
    node.sh(&format!(
        "systemctl stop cri-systemd && grep -q '{id}' {record} && sed -i 's/{image_id}/busybox-of-an-older-version/g' {record} \
         && ! grep -q '{image_id}' {record} && systemctl start cri-systemd",
        image_id = busybox.id()
    ));
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    // Anything that collects garbage: here RemoveImage of an absent image.
    remove(&mut client, "127.0.0.1:5000/e2e/absent:1").await.expect("RemoveImage of an absent image");
    assert!(
        layer_dirs(&node).contains(&busybox.chain_ids()[0]),
        "garbage collection deleted the layer of a container that uses it"
    );
    start(&mut client, &id).await.expect("StartContainer of the container whose record was changed");
    let state = e2e::crisimple::status(&mut client, &id).await.state;
    assert_eq!(state, cri::ContainerState::ContainerRunning as i32);
    client.runtime.remove_container(cri::RemoveContainerRequest { container_id: id }).await.expect("RemoveContainer");
    assert_eq!((blobs(&node), layer_dirs(&node)), Default::default(), "the image outlived its last container");
}

/// RemoveImage (and its garbage collection) at the same time as CreateContainer of the same
/// image, many times: either CreateContainer fails with NotFound, or the container it created
/// starts (its layers were not collected between their lookup and the container's record).
#[tokio::test]
async fn remove_image_racing_create_container_never_leaves_a_container_without_layers() {
    let node = node_with("img-race", "", &[plain_registry("127.0.0.1:5000", &[])]);
    let (mut client, reference, busybox) = node_with_busybox(&node).await;
    let pod = e2e::crisimple::run_pod(&mut client, "race").await;
    let (mut created, mut refused) = (0, 0);
    for round in 0..40u32 {
        assert_eq!(pull(&mut client, &reference, None).await.expect("PullImage"), busybox.id());
        let config = container_config(&format!("c{round}"), &reference, &["/bin/busybox", "sleep", "100000"]);
        let (mut creator, mut remover) = (client.clone(), client.clone());
        let jitter = Duration::from_micros(u64::from(round % 8) * 300);
        let (made, removed) = tokio::join!(create(&mut creator, &pod, config), async {
            tokio::time::sleep(jitter).await;
            remove(&mut remover, &reference).await
        });
        removed.expect("RemoveImage");
        match made {
            Ok(id) => {
                created += 1;
                if let Err(e) = start(&mut client, &id).await {
                    panic!("round {round}: the container created while its image was removed cannot start: {e:?}");
                }
                let request = cri::RemoveContainerRequest { container_id: id };
                client.runtime.remove_container(request).await.expect("RemoveContainer");
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "round {round}: {e:?}");
                refused += 1;
            }
        }
    }
    eprintln!("{created} containers created, {refused} refused for want of their image");
    assert_eq!((blobs(&node), layer_dirs(&node)), Default::default(), "the image outlived its last container");
    assert_store_sound(&node);
}
