//! The WebSocket side of the streaming server (cri-server/src/streaming/transport.rs,
//! WsChannels): the input is everything a client sends after the upgrade (masked frames whose
//! first payload byte is the channel.k8s.io channel). Messages must come out split by channel,
//! none larger than the message cap, and the session must end once the client's bytes end.
#![no_main]

use cri_server::streaming::transport::{WsChannels, until_closed};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let data = data.to_vec();
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = from_server.read_to_end(&mut sink).await;
        });
        let feed = tokio::spawn(async move {
            let _ = to_server.write_all(&data).await;
            let _ = to_server.shutdown().await;
        });
        let mut channels = WsChannels::start(server, None).await;
        let mut closed = channels.closed.clone();
        // As a session does: the first message goes out at once, input is read until the end.
        let _ = channels.outgoing.send((1, Vec::new())).await;
        loop {
            tokio::select! {
                message = channels.incoming.recv() => match message {
                    Some((_channel, bytes)) => assert!(bytes.len() < 1 << 20, "a message beyond the cap"),
                    None => break,
                },
                _ = until_closed(&mut closed) => break,
            }
        }
        let _ = feed.await;
        channels.finish().await;
        let _ = drain.await;
    });
});
