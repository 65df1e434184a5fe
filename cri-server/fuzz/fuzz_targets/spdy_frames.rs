//! SPDY/3.1 frames (cri-server/src/streaming/spdy.rs) on arbitrary bytes, read as one
//! connection's stream with one header decompression context, as the streaming server does.
//! Every frame read must encode again and read back the same (with fresh contexts), and a
//! hostile stream must end in an error, never a panic or an allocation beyond the frame cap.
#![no_main]

use cri_server::streaming::spdy::{Frame, HeaderDecoder, HeaderEncoder, encode_frame, read_frame};
use std::future::Future;

use libfuzzer_sys::fuzz_target;

/// Reading from a slice never waits: one poll finishes the future.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => unreachable!("a slice reader never waits"),
    }
}

fuzz_target!(|data: &[u8]| {
    block_on(async {
        let mut reader = data;
        let mut decoder = HeaderDecoder::new();
        let (mut encoder, mut again) = (HeaderEncoder::new(), HeaderDecoder::new());
        while let Ok(Some(frame)) = read_frame(&mut reader, &mut decoder).await {
            if matches!(frame, Frame::Unknown { .. }) {
                continue; // other versions and types are skipped, not kept
            }
            let wire = encode_frame(&frame, &mut encoder);
            let back = read_frame(&mut &wire[..], &mut again).await.expect("an encoded frame reads back");
            assert_eq!(back.as_ref(), Some(&frame));
        }
    })
});
