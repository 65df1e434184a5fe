//! SPDY header blocks (cri-server/src/streaming/spdy.rs, HeaderDecoder) from arbitrary bytes:
//! the input is the block before compression, compressed here as a client would (zlib with the
//! SPDY/3 dictionary, sync flush), so the fuzzer explores the block parser rather than zlib.
//! What the decoder returns must stay bounded like the block itself (256 KiB decompressed):
//! the headers built from a block may not take more than twice that.
#![no_main]

use cri_server::streaming::spdy::{HeaderDecoder, dictionary};
use flate2::{Compress, Compression, FlushCompress};
use libfuzzer_sys::fuzz_target;

fn compress(block: &[u8]) -> Vec<u8> {
    let mut zlib = Compress::new(Compression::default(), true);
    zlib.set_dictionary(&dictionary()).unwrap();
    let mut out = Vec::with_capacity(block.len() + 1024);
    let mut input = block;
    loop {
        out.reserve(1024);
        let before = zlib.total_in();
        zlib.compress_vec(input, &mut out, FlushCompress::Sync).unwrap();
        input = &input[(zlib.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            return out;
        }
    }
}

fuzz_target!(|block: &[u8]| {
    let Ok(headers) = HeaderDecoder::new().decode(&compress(block)) else { return };
    // Each entry costs its two Strings' bytes and headers.
    let decoded: usize = headers.iter().map(|(name, value)| name.len() + value.len() + 48).sum();
    assert!(decoded <= 512 * 1024, "a {} byte header block decoded into {decoded} bytes", block.len());
});
