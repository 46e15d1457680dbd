//! A store decorator that counts every request in a mount's [`Metrics`]: the operation, the
//! bytes sent and received, whether it failed, and how long it took. A missing object or a
//! condition that did not hold is an answer, not a failure: only other errors count as errors.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    CompletedPart, ErrorKind, GetOptions, GetResult, GetStream, ListOptions, ListPage, Metadata,
    ObjectInfo, Op, PartSource, PutCondition, PutOptions, PutResult, Result, SharedStore, Store,
    UploadId,
};
use crate::metrics::Metrics;

/// Wraps a store and counts what passes through.
#[derive(Debug)]
pub struct MeteredStore {
    inner: SharedStore,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: SharedStore, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    /// Runs one request that sends `sent` bytes; `received` tells how many came back.
    async fn count<T>(
        &self,
        op: Op,
        sent: usize,
        request: impl Future<Output = Result<T>>,
        received: impl FnOnce(&T) -> usize,
    ) -> Result<T> {
        let started = Instant::now();
        let answer = request.await;
        let got = answer.as_ref().map_or(0, received);
        self.metrics.store_request(
            op.name(),
            sent as u64,
            got as u64,
            answer.as_ref().is_err_and(|err| {
                !matches!(
                    err.kind(),
                    ErrorKind::NotFound | ErrorKind::PreconditionFailed
                )
            }),
            started.elapsed(),
        );
        answer
    }
}

fn nothing<T>(_: &T) -> usize {
    0
}

#[async_trait]
impl Store for MeteredStore {
    async fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.count(Op::Head, 0, self.inner.head(key), nothing).await
    }

    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult> {
        let request = self.inner.get(key, options);
        self.count(Op::Get, 0, request, |got| got.body.len()).await
    }

    /// Counted as a GET of the whole range once the answer's headers are in (a body cut short
    /// later shows as the reader's error, not here).
    async fn get_stream(&self, key: &str, options: GetOptions) -> Result<GetStream> {
        let request = self.inner.get_stream(key, options);
        self.count(Op::Get, 0, request, |got| {
            (got.range.end - got.range.start) as usize
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, options: PutOptions) -> Result<PutResult> {
        let sent = body.len();
        let request = self.inner.put(key, body, options);
        self.count(Op::Put, sent, request, nothing).await
    }

    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId> {
        let request = self.inner.start_multipart(key, metadata);
        self.count(Op::StartMultipart, 0, request, nothing).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        let sent = body.len();
        let request = self.inner.upload_part(key, upload, part_number, body);
        self.count(Op::UploadPart, sent, request, nothing).await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        source: &PartSource,
    ) -> Result<CompletedPart> {
        let request = self
            .inner
            .upload_part_copy(key, upload, part_number, source);
        self.count(Op::UploadPartCopy, 0, request, nothing).await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult> {
        let request = self.inner.complete_multipart(key, upload, parts, condition);
        self.count(Op::CompleteMultipart, 0, request, nothing).await
    }

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()> {
        let request = self.inner.abort_multipart(key, upload);
        self.count(Op::AbortMultipart, 0, request, nothing).await
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage> {
        let request = self.inner.list(prefix, options);
        self.count(Op::List, 0, request, nothing).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.count(Op::Delete, 0, self.inner.delete(key), nothing)
            .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let request = self.inner.delete_many(keys);
        self.count(Op::DeleteMany, 0, request, nothing).await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult> {
        let request = self.inner.copy(source_key, dest_key, metadata);
        self.count(Op::Copy, 0, request, nothing).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faults::FaultyStore;
    use crate::store::memory::MemoryStore;
    use crate::store::{StoreError, StoreExt};

    #[tokio::test]
    async fn requests_bytes_and_errors_are_counted() {
        let metrics = Arc::new(Metrics::default());
        let faulty = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new())));
        let store = MeteredStore::new(faulty.clone(), Arc::clone(&metrics));
        store
            .put("k", Bytes::from_static(b"hello"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(store.get_all("k").await.unwrap().1.as_ref(), b"hello");
        let missing = store.head("nothing here").await.unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
        faulty.fail_next(None, 1, StoreError::new(ErrorKind::Unavailable, "injected"));
        assert!(store.head("k").await.is_err());
        let counted = metrics.snapshot().store;
        assert_eq!(counted["put"].bytes_sent, 5);
        assert_eq!(counted["get"].bytes_received, 5);
        assert_eq!(counted["head"].latency.count, 2);
        assert_eq!(
            counted["head"].errors, 1,
            "a missing object is an answer, not an error"
        );
    }
}
