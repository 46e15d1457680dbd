//! A store decorator that injects faults, for tests: fail the Nth call of an operation, fail the
//! next calls with a chosen error, or add latency. Everything else passes through to the inner
//! store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use super::Op;
use super::{
    CompletedPart, GetOptions, GetResult, ListOptions, ListPage, Metadata, ObjectInfo, PartSource,
    PutCondition, PutOptions, PutResult, Result, SharedStore, Store, StoreError, UploadId,
};

/// When a fault applies.
#[derive(Debug, Clone)]
enum Trigger {
    /// The Nth call (1-based) of the operation, counted from when the store was made.
    Nth(u64),
    /// The next this many calls.
    Next(u64),
    /// Every call.
    Always,
}

#[derive(Debug, Clone)]
struct Fault {
    op: Option<Op>,
    trigger: Trigger,
    error: Option<StoreError>,
    latency: Duration,
}

#[derive(Debug, Default)]
struct Book {
    faults: Vec<Fault>,
    calls: HashMap<Op, u64>,
    /// Puts ignore their condition, as some S3 implementations do.
    ignore_conditions: bool,
}

/// Wraps a store and misbehaves as told.
#[derive(Debug)]
pub struct FaultyStore {
    inner: SharedStore,
    book: Mutex<Book>,
}

impl FaultyStore {
    pub fn new(inner: SharedStore) -> Self {
        Self {
            inner,
            book: Mutex::default(),
        }
    }

    fn add(&self, fault: Fault) {
        self.book().faults.push(fault);
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `nth` call (1-based) of `op` fails with `error`.
    pub fn fail_nth(&self, op: Op, nth: u64, error: StoreError) {
        self.add(Fault {
            op: Some(op),
            trigger: Trigger::Nth(nth),
            error: Some(error),
            latency: Duration::ZERO,
        });
    }

    /// The next `count` calls of `op` (any operation if `None`) fail with `error`.
    pub fn fail_next(&self, op: Option<Op>, count: u64, error: StoreError) {
        self.add(Fault {
            op,
            trigger: Trigger::Next(count),
            error: Some(error),
            latency: Duration::ZERO,
        });
    }

    /// Every call of `op` (any operation if `None`) waits `latency` first.
    pub fn add_latency(&self, op: Option<Op>, latency: Duration) {
        self.add(Fault {
            op,
            trigger: Trigger::Always,
            error: None,
            latency,
        });
    }

    /// Removes every fault; calls keep being counted.
    /// From now on, puts ignore `If-None-Match` and `If-Match`, like a store that does not
    /// implement conditional writes.
    pub fn ignore_put_conditions(&self) {
        self.book().ignore_conditions = true;
    }

    pub fn clear(&self) {
        self.book().faults.clear();
    }

    /// How many calls of `op` were made so far (including failed ones).
    pub fn calls(&self, op: Op) -> u64 {
        self.book().calls.get(&op).copied().unwrap_or(0)
    }

    /// Counts the call and decides its fate: the latency to add, and an error to fail with.
    fn decide(&self, op: Op) -> (Duration, Option<StoreError>) {
        let mut book = self.book();
        let count = {
            let calls = book.calls.entry(op).or_insert(0);
            *calls += 1;
            *calls
        };
        let mut latency = Duration::ZERO;
        let mut error = None;
        for fault in book
            .faults
            .iter_mut()
            .filter(|f| f.op.is_none_or(|o| o == op))
        {
            let applies = match &mut fault.trigger {
                Trigger::Nth(n) => *n == count,
                Trigger::Always => true,
                Trigger::Next(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                Trigger::Next(_) => false,
            };
            if applies {
                latency += fault.latency;
                if error.is_none() {
                    error = fault.error.clone();
                }
            }
        }
        book.faults
            .retain(|f| !matches!(f.trigger, Trigger::Next(0)));
        (latency, error)
    }

    async fn enter(&self, op: Op) -> Result<()> {
        let (latency, error) = self.decide(op);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.enter(Op::Head).await?;
        self.inner.head(key).await
    }

    async fn get(&self, key: &str, options: GetOptions) -> Result<GetResult> {
        self.enter(Op::Get).await?;
        self.inner.get(key, options).await
    }

    async fn put(&self, key: &str, body: Bytes, mut options: PutOptions) -> Result<PutResult> {
        self.enter(Op::Put).await?;
        if self.book().ignore_conditions {
            options.condition = PutCondition::Always;
        }
        self.inner.put(key, body, options).await
    }

    async fn start_multipart(&self, key: &str, metadata: Metadata) -> Result<UploadId> {
        self.enter(Op::StartMultipart).await?;
        self.inner.start_multipart(key, metadata).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        body: Bytes,
    ) -> Result<CompletedPart> {
        self.enter(Op::UploadPart).await?;
        self.inner.upload_part(key, upload, part_number, body).await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload: &UploadId,
        part_number: u32,
        source: &PartSource,
    ) -> Result<CompletedPart> {
        self.enter(Op::UploadPartCopy).await?;
        self.inner
            .upload_part_copy(key, upload, part_number, source)
            .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload: &UploadId,
        parts: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> Result<PutResult> {
        self.enter(Op::CompleteMultipart).await?;
        self.inner
            .complete_multipart(key, upload, parts, condition)
            .await
    }

    async fn abort_multipart(&self, key: &str, upload: &UploadId) -> Result<()> {
        self.enter(Op::AbortMultipart).await?;
        self.inner.abort_multipart(key, upload).await
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListPage> {
        self.enter(Op::List).await?;
        self.inner.list(prefix, options).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.enter(Op::Delete).await?;
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        self.enter(Op::DeleteMany).await?;
        self.inner.delete_many(keys).await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<Metadata>,
    ) -> Result<PutResult> {
        self.enter(Op::Copy).await?;
        self.inner.copy(source_key, dest_key, metadata).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{ErrorKind, StoreExt};
    use std::sync::Arc;

    fn unavailable() -> StoreError {
        StoreError::new(ErrorKind::Unavailable, "injected")
    }

    #[tokio::test]
    async fn the_nth_call_fails_and_the_rest_pass() {
        let store = FaultyStore::new(Arc::new(MemoryStore::new()));
        store.fail_nth(Op::Put, 2, unavailable());
        let put = |n: u8| store.put("k", Bytes::from(vec![n]), PutOptions::default());
        assert!(put(1).await.is_ok());
        assert_eq!(put(2).await.unwrap_err().kind(), ErrorKind::Unavailable);
        assert!(put(3).await.is_ok());
        assert_eq!(store.calls(Op::Put), 3);
        assert_eq!(store.get_all("k").await.unwrap().1, Bytes::from(vec![3]));
    }

    #[tokio::test]
    async fn next_calls_of_any_operation_fail_then_stop() {
        let store = FaultyStore::new(Arc::new(MemoryStore::new()));
        store.fail_next(None, 2, unavailable());
        assert!(store.head_opt("a").await.is_err());
        assert!(store.list("", ListOptions::default()).await.is_err());
        assert!(store.head_opt("a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn latency_is_added() {
        let store = FaultyStore::new(Arc::new(MemoryStore::new()));
        store.add_latency(Some(Op::Head), Duration::from_millis(200));
        let started = tokio::time::Instant::now();
        let _ = store.head_opt("a").await;
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
