//! The streaming list RPCs of cri-api 1.36 (StreamPodSandboxes, StreamContainers, StreamImages and
//! the stats ones; KEP-5825, kubelet feature gate CRIListStreaming): the same items as the unary
//! List RPC, sent in messages of at most [`ITEMS_PER_MESSAGE`] items so that a node with many pods
//! stays under gRPC's message size limit. The contract: each item in exactly one message, no empty
//! message (no items: the stream just ends), EOF after the last one.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

/// What the streaming list RPCs return.
pub type ListStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Items per message: a PodSandbox or ContainerStats with its labels and annotations is a few KiB
/// at most, so a message stays far below the 4 MiB default limit of gRPC clients.
pub const ITEMS_PER_MESSAGE: usize = 100;

/// `items` as a stream of messages built by `wrap`, each with 1 to [`ITEMS_PER_MESSAGE`] items.
pub fn chunked<I: Send + 'static, T: Send + 'static>(items: Vec<I>, wrap: fn(Vec<I>) -> T) -> ListStream<T> {
    let mut messages = Vec::with_capacity(items.len().div_ceil(ITEMS_PER_MESSAGE));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        messages.push(Ok(wrap(items.by_ref().take(ITEMS_PER_MESSAGE).collect())));
    }
    Box::pin(tokio_stream::iter(messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    async fn sizes(n: usize) -> Vec<usize> {
        let stream = chunked((0..n).collect::<Vec<_>>(), |chunk| chunk);
        stream.map(|m| m.unwrap().len()).collect().await
    }

    #[tokio::test]
    async fn every_item_once_in_non_empty_messages() {
        assert_eq!(sizes(0).await, Vec::<usize>::new());
        assert_eq!(sizes(1).await, vec![1]);
        assert_eq!(sizes(ITEMS_PER_MESSAGE).await, vec![ITEMS_PER_MESSAGE]);
        assert_eq!(sizes(2 * ITEMS_PER_MESSAGE + 3).await, vec![ITEMS_PER_MESSAGE, ITEMS_PER_MESSAGE, 3]);
        let all: Vec<usize> =
            chunked((0..250).collect(), |chunk| chunk).map(|m| m.unwrap()).collect::<Vec<_>>().await.concat();
        assert_eq!(all, (0..250).collect::<Vec<_>>());
    }
}
