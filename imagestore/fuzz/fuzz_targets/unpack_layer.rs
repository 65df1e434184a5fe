//! The layer unpacker (imagestore/src/unpack.rs) on arbitrary tar bytes, into a fresh directory
//! (the fuzzer runs as root, as the daemon does: devices, owners and trusted xattrs are real).
//! Whatever the archive says, nothing may appear beside the layer directory: a sentinel file
//! and the directory's siblings are checked after every run.
#![no_main]

use std::path::Path;

use imagestore::IdShift;
use imagestore::unpack::{Limits, unpack};
use libfuzzer_sys::fuzz_target;

fn names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    names
}

fuzz_target!(|data: &[u8]| {
    let work = tempfile::tempdir().unwrap();
    let layer = work.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    let sentinel = work.path().join("sentinel");
    std::fs::write(&sentinel, b"outside the layer").unwrap();
    let before = names(work.path());
    let limits = Limits { max_bytes: 1 << 20, max_entries: 1000 };
    let _ = unpack(data, &layer, "fuzz", limits, IdShift::new(0x7FFE_0000));
    assert_eq!(names(work.path()), before, "the archive changed the layer directory's parent");
    let meta = std::fs::symlink_metadata(&sentinel).unwrap();
    assert!(meta.file_type().is_file(), "the sentinel was replaced");
    assert_eq!(std::fs::read(&sentinel).unwrap(), b"outside the layer", "the sentinel was written through");
});
