//! The tar reader (imagestore/src/tarstream.rs) on arbitrary bytes: every header and every data
//! byte read, as the unpacker reads them. It must return entries or an error, never panic, and
//! never hold more than its metadata cap (the run's -rss_limit_mb catches that).
#![no_main]

use std::io::Read;

use imagestore::tarstream::{TarError, TarReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tar = TarReader::new(data);
    let mut buffer = [0u8; 4096];
    loop {
        match tar.next_header() {
            Ok(Some(header)) => {
                let mut read = 0u64;
                let mut entry = tar.data();
                loop {
                    match entry.read(&mut buffer) {
                        Ok(0) => break,
                        Ok(n) => read += n as u64,
                        Err(_) => return,
                    }
                }
                assert!(read <= header.size, "read {read} bytes of an entry of {}", header.size);
                assert_eq!(header.mode & !0o7777, 0, "mode keeps only permission bits");
            }
            Ok(None) => return,
            Err(TarError::Malformed { .. } | TarError::Io(_)) => return,
        }
    }
});
