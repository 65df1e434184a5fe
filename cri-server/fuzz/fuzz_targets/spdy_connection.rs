//! A SPDY connection being served (cri-server/src/streaming/transport.rs, SpdyConnection): the
//! input is everything a client sends after the upgrade. The stream table, the per-stream
//! queues and the replies the server writes are exercised; the connection must end (as closed)
//! once the client's bytes end, whatever they were.
#![no_main]

use cri_server::streaming::transport::{SpdyConnection, until_closed};
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
        let mut connection = SpdyConnection::start(server, None);
        let mut closed = connection.closed.clone();
        let mut readers = Vec::new();
        loop {
            tokio::select! {
                stream = connection.streams.recv() => match stream {
                    Some(mut stream) => readers.push(tokio::spawn(async move {
                        while stream.data.recv().await.is_some() {}
                    })),
                    None => break,
                },
                _ = until_closed(&mut closed) => break,
            }
        }
        drop(readers);
        let _ = feed.await;
        connection.finish().await;
        let _ = drain.await;
    });
});
