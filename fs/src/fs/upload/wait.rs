//! Waiting for changes to reach the store: fsync, flush, unmount.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{FsError, FsResult};
use crate::fs::Filesystem;
use crate::fs::contents::FileData;
use crate::store::{ErrorKind, StoreError};

impl Filesystem {
    /// Waits until the change `seq` is in the store (and so every change it waited for: see
    /// `Journal::take_runnable`).
    pub async fn wait_applied(&self, seq: u64) -> FsResult<()> {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.change_log().is_pending(seq) {
                return Ok(());
            }
            if let Some(why) = self.fenced() {
                return Err(FsError::Fenced(why));
            }
            notified.await;
        }
    }

    /// Makes everything due now and waits until the store holds it all (at most `limit`).
    pub async fn drain(&self, limit: Option<Duration>) -> FsResult<()> {
        let open: Vec<Arc<FileData>> = self
            .files
            .lock()
            .await
            .values()
            .filter_map(|w| w.upgrade())
            .collect();
        for data in open {
            if data.content.lock().await.dirty() {
                self.queue_upload(&data, false).await?;
            }
        }
        if let Err(err) = self.update_change_log(|j| j.hurry_all()).await {
            // A full cache disk: the changes still go, after their write-back delay.
            tracing::warn!("could not make every change due now: {err}");
        }
        let deadline = limit.map(|l| Instant::now() + l);
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let left = self.change_log().len();
            if left == 0 {
                return Ok(());
            }
            if let Some(why) = self.fenced() {
                return Err(FsError::Fenced(format!(
                    "{why}; {left} changes stay in the cache, not uploaded"
                )));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let why = self
                    .uploads
                    .status()
                    .last_error
                    .clone()
                    .map_or_else(String::new, |(_, e)| format!(": {e}"));
                return Err(FsError::Store(StoreError::new(
                    ErrorKind::Unavailable,
                    format!("{left} changes are not yet in the store{why}"),
                )));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
