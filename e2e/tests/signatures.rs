//! The image signature policy end to end (`[images.signatures]`, imagestore/src/signature.rs):
//! one node, its daemon configured with `signed`, `reject` and `accept` scopes, Debian's
//! docker-registry in the node holding images the test builds and signs itself with throwaway
//! keys, in exactly cosign's format (e2e/src/registry.rs). Every refusal is checked through the
//! CRI (PermissionDenied naming the scope and the reason) and on disk (nothing of the refused
//! image in the store: no record, no blob, no layer, nothing in tmp/).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use e2e::oci::{self, Compression, ConfigOptions, Image, LayerBuilder};
use e2e::registry::{CosignSignature, Registry, RegistryOptions, SigningKey, digest_tag};
use e2e::{CriClient, Node, NodeOptions, cri};
use tonic::Code;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const REGISTRY: &str = "127.0.0.1:5000";
/// A registry name no registry answers for: only its mirror (on 5001) serves it.
const MIRRORED: &str = "127.0.0.1:5003";
const MIRROR_PORT: u16 = 5001;
const CONFIG_IN_NODE: &str = "/etc/cri-systemd/config.toml";

/// A small image of its own (one layer with `name` in it), so that what a refused pull would
/// have stored is recognisable.
fn image(name: &str) -> Image {
    let mut layer = LayerBuilder::new();
    layer.file("which", 0o644, name.as_bytes());
    Image::new(vec![layer.build(Compression::Gzip)], ConfigOptions::default())
}

fn config(p256: &SigningKey, ed25519: &SigningKey, p256_key: &str) -> String {
    let (p256_pem, ed_pem) = (p256.public_pem(), ed25519.public_pem());
    format!(
        r#"[images]
retries = 1

[images.registries."{REGISTRY}"]
plain_http = true

[images.registries."{MIRRORED}"]
plain_http = true
mirrors = ["http://127.0.0.1:{MIRROR_PORT}"]

[images.signatures.default]
policy = "accept"

[images.signatures.scopes."{REGISTRY}/p256"]
policy = "signed"
{p256_key}

[images.signatures.scopes."{REGISTRY}/ed25519"]
policy = "signed"
key_data = ["""{ed_pem}"""]

[images.signatures.scopes."{REGISTRY}/p256/rejected"]
policy = "reject"

[images.signatures.scopes."{MIRRORED}"]
policy = "signed"
key_data = ["""{p256_pem}""", """{ed_pem}"""]
"#
    )
}

async fn pull(client: &mut CriClient, image: &str) -> Result<String, tonic::Status> {
    let spec = cri::ImageSpec { image: image.to_owned(), ..Default::default() };
    let request = cri::PullImageRequest { image: Some(spec), auth: None, sandbox_config: None };
    client.image.pull_image(request).await.map(|r| r.into_inner().image_ref)
}

async fn listed_ids(client: &mut CriClient) -> BTreeSet<String> {
    let response = client.image.list_images(cri::ListImagesRequest { filter: None }).await.expect("ListImages");
    response.into_inner().images.into_iter().map(|i| i.id).collect()
}

fn names(dir: PathBuf) -> BTreeSet<String> {
    match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("read {}: {e}", dir.display()),
    }
}

/// Blob and layer directory names, and tmp/ entries, of the node's image store.
fn store_contents(node: &Node) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let store = node.dir().join("state/images");
    (names(store.join("blobs/sha256")), names(store.join("layers/sha256")), names(store.join("tmp")))
}

/// Pulls `reference`, expects PermissionDenied with each of `expected` in the message, and
/// checks that the store is as it was and holds nothing of `refused`.
async fn assert_refused(node: &Node, client: &mut CriClient, reference: &str, refused: &Image, expected: &[&str]) {
    let before = store_contents(node);
    let ids_before = listed_ids(client).await;
    let status = pull(client, reference).await.expect_err(&format!("{reference} must be refused"));
    assert_eq!(status.code(), Code::PermissionDenied, "{reference}: {status:?}");
    for needle in expected {
        assert!(status.message().contains(needle), "{reference}: {:?} lacks {needle:?}", status.message());
    }
    let after = store_contents(node);
    assert_eq!(after, before, "{reference}: the refused pull changed the store");
    assert!(after.2.is_empty(), "{reference}: leftovers in tmp/: {:?}", after.2);
    for blob in [&refused.manifest, &refused.config, &refused.layers[0].blob] {
        assert!(!after.0.contains(blob.hex()), "{reference}: blob {} of the refused image was stored", blob.digest);
    }
    for chain_id in refused.chain_ids() {
        assert!(!after.1.contains(chain_id.strip_prefix("sha256:").unwrap()), "{reference}: layer {chain_id} unpacked");
    }
    assert_eq!(listed_ids(client).await, ids_before, "{reference}: an image record appeared");
    let spec = cri::ImageSpec { image: reference.to_owned(), ..Default::default() };
    let found = client.image.image_status(cri::ImageStatusRequest { image: Some(spec), verbose: false }).await;
    assert!(found.unwrap().into_inner().image.is_none(), "{reference}: ImageStatus finds the refused image");
}

/// Signed images pulled (P-256 and Ed25519, by tag and by digest, through the `.sig` tag and
/// through cosign's referrers mode, through a mirror); refused: unsigned, a tampered payload,
/// another key, a signature of another digest, another repository's signature, a `reject`
/// scope, an unsigned image on the mirror. Then the keys as a PEM file after a daemon restart,
/// and a policy with an unreadable key file refused at start-up, naming its scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_policy() {
    let p256 = SigningKey::p256(1);
    let ed25519 = SigningKey::ed25519(2);
    let stranger = SigningKey::p256(3);
    let p256_inline = format!("key_data = [\"\"\"{}\"\"\"]", p256.public_pem());
    let path = std::env::temp_dir().join(format!("cri-e2e-signatures-{}.toml", std::process::id()));
    std::fs::write(&path, config(&p256, &ed25519, &p256_inline)).unwrap();
    let node = Node::up("signatures", NodeOptions { config: Some(path.clone()), ..Default::default() });
    let _ = std::fs::remove_file(&path);
    let registry = Registry::start(&node, "signatures", 5000, RegistryOptions::default());
    let mirror = Registry::start(&node, "signatures-mirror", MIRROR_PORT, RegistryOptions::default());
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let signed_as = |repo: &str| format!("{REGISTRY}/{repo}");

    // Unsigned under a `signed` scope: refused, nothing stored.
    let unsigned = image("unsigned");
    let reference = registry.push_image("p256/unsigned", "1", &unsigned);
    let scope = format!("scope \"{REGISTRY}/p256\"");
    assert_refused(&node, &mut client, &reference, &unsigned, &[&scope, "no signature"]).await;

    // Signed with P-256, cosign's `.sig` tag: pulled by tag, and by digest.
    let signed = image("p256-signed");
    let reference = registry.push_image("p256/app", "1", &signed);
    registry.push_cosign_signatures(
        "p256/app",
        &signed.manifest.digest,
        &[CosignSignature::new(&p256, &signed.manifest.digest, &signed_as("p256/app"))],
    );
    assert_eq!(pull(&mut client, &reference).await.expect("a signed image is pulled"), signed.id());
    let by_digest = format!("{REGISTRY}/p256/app@{}", signed.manifest.digest);
    assert_eq!(pull(&mut client, &by_digest).await.expect("pulled by digest"), signed.id());
    assert!(node.logs().contains("signature verified"), "{}", node.logs());

    // Signed with Ed25519.
    let ed_signed = image("ed25519-signed");
    let reference = registry.push_image("ed25519/app", "1", &ed_signed);
    registry.push_cosign_signatures(
        "ed25519/app",
        &ed_signed.manifest.digest,
        &[CosignSignature::new(&ed25519, &ed_signed.manifest.digest, &signed_as("ed25519/app"))],
    );
    assert_eq!(pull(&mut client, &reference).await.expect("an Ed25519-signed image is pulled"), ed_signed.id());

    // Signed in cosign's OCI 1.1 referrers mode. docker-registry 2.8 has no referrers API (404),
    // so the signature is found through the referrers tag schema's index.
    let referred = image("referrers-signed");
    let reference = registry.push_image("p256/referred", "1", &referred);
    let api = registry.request("GET", &format!("/v2/p256/referred/referrers/{}", referred.manifest.digest), &[], b"");
    assert_eq!(api.unwrap().status, 404, "this registry has the referrers API now: test it directly");
    registry.push_cosign_referrer(
        "p256/referred",
        &referred.manifest,
        &[CosignSignature::new(&p256, &referred.manifest.digest, &signed_as("p256/referred"))],
    );
    assert_eq!(pull(&mut client, &reference).await.expect("signed through referrers"), referred.id());
    let asked = registry.access_lines(&format!("GET /v2/p256/referred/referrers/{}", referred.manifest.digest));
    assert!(!asked.is_empty(), "the daemon did not ask the referrers API:\n{}", registry.logs());

    // A tampered payload: the registry serves other bytes (same size) for the payload blob.
    let tampered = image("tampered");
    let reference = registry.push_image("p256/tampered", "1", &tampered);
    let signature = CosignSignature::new(&p256, &tampered.manifest.digest, &signed_as("p256/tampered"));
    registry.push_cosign_signatures("p256/tampered", &tampered.manifest.digest, std::slice::from_ref(&signature));
    let forged = String::from_utf8(signature.payload.clone()).unwrap().replace("p256/tampered", "p256/tampereD");
    registry.tamper_blob(&oci::sha256(&signature.payload), forged.as_bytes());
    assert_refused(&node, &mut client, &reference, &tampered, &[&scope, "bad signature"]).await;

    // Signed, but by a key the scope does not have.
    let other_key = image("other-key");
    let reference = registry.push_image("p256/other-key", "1", &other_key);
    registry.push_cosign_signatures(
        "p256/other-key",
        &other_key.manifest.digest,
        &[CosignSignature::new(&stranger, &other_key.manifest.digest, &signed_as("p256/other-key"))],
    );
    assert_refused(&node, &mut client, &reference, &other_key, &[&scope, "key unknown"]).await;

    // A valid signature of another image's digest, put under this image's `.sig` tag.
    let swapped = image("swapped");
    let reference = registry.push_image("p256/app", "swapped", &swapped);
    registry.push_cosign_signatures(
        "p256/app",
        &swapped.manifest.digest,
        &[CosignSignature::new(&p256, &signed.manifest.digest, &signed_as("p256/app"))],
    );
    assert_refused(&node, &mut client, &reference, &swapped, &[&scope, "digest mismatch", &swapped.manifest.digest])
        .await;

    // A valid signature of this digest, made for another repository.
    let elsewhere = image("elsewhere");
    let reference = registry.push_image("p256/elsewhere", "1", &elsewhere);
    registry.push_cosign_signatures(
        "p256/elsewhere",
        &elsewhere.manifest.digest,
        &[CosignSignature::new(&p256, &elsewhere.manifest.digest, &signed_as("p256/app"))],
    );
    assert_refused(&node, &mut client, &reference, &elsewhere, &[&scope, "reference mismatch"]).await;

    // The `reject` scope (more specific than its parent `signed` scope): refused before the
    // registry is asked anything, signed or not.
    let rejected = image("rejected");
    let reference = registry.push_image("p256/rejected/app", "1", &rejected);
    registry.push_cosign_signatures(
        "p256/rejected/app",
        &rejected.manifest.digest,
        &[CosignSignature::new(&p256, &rejected.manifest.digest, &signed_as("p256/rejected/app"))],
    );
    let rejected_scope = format!("scope \"{REGISTRY}/p256/rejected\"");
    assert_refused(&node, &mut client, &reference, &rejected, &[&rejected_scope, "rejects every image"]).await;
    assert!(registry.access_lines("/v2/p256/rejected/").is_empty(), "the registry was asked for a rejected image");

    // Outside every scope: the default (accept) takes unsigned images.
    let open = image("open");
    let reference = registry.push_image("open/app", "1", &open);
    assert_eq!(pull(&mut client, &reference).await.expect("the default scope accepts"), open.id());

    // A mirror serving the same signed image: the policy is that of the name requested
    // (127.0.0.1:5003), the signature names it too and comes through the mirror.
    let mirrored_name = format!("{MIRRORED}/team/app");
    mirror.push_image("team/app", "1", &signed);
    mirror.push_cosign_signatures(
        "team/app",
        &signed.manifest.digest,
        &[CosignSignature::new(&p256, &signed.manifest.digest, &mirrored_name)],
    );
    let reference = format!("{mirrored_name}:1");
    assert_eq!(pull(&mut client, &reference).await.expect("pulled through the mirror"), signed.id());
    let sig_tag = digest_tag(&signed.manifest.digest, ".sig");
    assert!(!mirror.access_lines(&format!("/v2/team/app/manifests/{sig_tag}")).is_empty(), "{}", mirror.logs());
    // ... and an unsigned image on the mirror is refused under the mirrored name's scope.
    let mirrored_unsigned = image("mirrored-unsigned");
    mirror.push_image("team/unsigned", "1", &mirrored_unsigned);
    let reference = format!("{MIRRORED}/team/unsigned:1");
    let mirror_scope = format!("scope \"{MIRRORED}\"");
    assert_refused(&node, &mut client, &reference, &mirrored_unsigned, &[&mirror_scope]).await;

    // The keys from a PEM file, after a restart: what was pulled is still there, and the
    // policy holds (a P-256 image pulled, the unsigned one refused).
    node.write_file("/etc/cri-systemd/keys/p256.pub", &p256.public_pem());
    node.write_file(CONFIG_IN_NODE, &config(&p256, &ed25519, "keys = [\"/etc/cri-systemd/keys/p256.pub\"]"));
    node.sh("systemctl restart cri-systemd");
    let mut client = node.cri(ANSWER_TIMEOUT).await;
    let ids = listed_ids(&mut client).await;
    for kept in [&signed, &ed_signed, &referred, &open] {
        assert!(ids.contains(kept.id()), "{} lost over the restart: {ids:?}", kept.id());
    }
    let filed = image("file-key");
    let reference = registry.push_image("p256/file-key", "1", &filed);
    registry.push_cosign_signatures(
        "p256/file-key",
        &filed.manifest.digest,
        &[CosignSignature::new(&p256, &filed.manifest.digest, &signed_as("p256/file-key"))],
    );
    assert_eq!(pull(&mut client, &reference).await.expect("signed, key from a file"), filed.id());
    let reference = format!("{REGISTRY}/p256/unsigned:1");
    assert_refused(&node, &mut client, &reference, &unsigned, &[&scope, "no signature"]).await;

    // A policy whose key file cannot be read: the daemon refuses to start, naming the scope and
    // the file (the config check says the same).
    node.write_file(CONFIG_IN_NODE, &config(&p256, &ed25519, "keys = [\"/etc/cri-systemd/keys/missing.pub\"]"));
    let check = node.exec(&["/usr/local/bin/cri-systemd", "--config", CONFIG_IN_NODE, "config"]);
    let said = format!("{}{}", check.stdout, check.stderr);
    assert!(!check.success(), "a policy with a missing key file passed: {said}");
    let expected =
        format!("images.signatures.scopes.\"{REGISTRY}/p256\": cannot read key file /etc/cri-systemd/keys/missing.pub");
    assert!(said.contains(&expected), "{said}");
}
