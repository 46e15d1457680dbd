//! Upkeep of the cache: counting changed bytes (which makes writers wait when they fill the
//! cache), evicting clean data beyond the cache size (least recently used first, never a file
//! open here or named by a pending change), making room for a write or a read on a full disk,
//! and the uploader's once-a-second tick. Owns `CacheUpkeep`.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Evictable;
use crate::error::FsResult;
use crate::fs::contents::FileData;
use crate::fs::direct::DirectWriteCheck;
use crate::fs::{Filesystem, blocking};

/// The longest the uploader trusts an unchanged cache disk to mean an unchanged cache.
const CACHE_RECOUNT_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// Evicted beyond what a write or read needs, so the next ones find room.
const ROOM_SLACK: u64 = 8 << 20;

/// What upkeep counted last: changed bytes, and the cache disk's free bytes.
#[derive(Debug, Default)]
pub(super) struct CacheUpkeep {
    /// Bytes of changed data not yet in the store (refreshed by the uploader's tick).
    dirty_bytes: AtomicU64,
    /// The cache disk's free bytes at the last count of the cache, and when: while they stay
    /// the same, nothing was written to or removed from the cache, so it is not counted again
    /// (one `stat` per cache file, every second, on an idle mount). A leaf lock.
    last_count: Mutex<Option<(u64, Instant)>>,
}

impl CacheUpkeep {
    pub(super) fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Acquire)
    }

    fn set_dirty_bytes(&self, bytes: u64) {
        self.dirty_bytes.store(bytes, Ordering::Release);
    }

    fn last_count(&self) -> Option<(u64, Instant)> {
        *self.last_count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_last_count(&self, count: Option<(u64, Instant)>) {
        *self.last_count.lock().unwrap_or_else(|p| p.into_inner()) = count;
    }
}

impl Filesystem {
    /// Writers wait here while changed data fills the cache and uploads can make room.
    pub(super) async fn wait_for_room(&self) {
        loop {
            let full = self.upkeep.dirty_bytes() > self.config.cache_size;
            if !full || self.change_log().is_empty() {
                return;
            }
            let notified = self.progress.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            self.refresh_dirty_bytes().await;
        }
    }

    /// Counts the bytes of changed data (pending uploads, and changed open files).
    pub(super) async fn refresh_dirty_bytes(&self) {
        let mut names = self.referenced_cache_files();
        for data in self.files.lock().await.values().filter_map(|w| w.upgrade()) {
            if let Ok(content) = data.content.try_lock()
                && content.dirty()
            {
                names.insert(content.cache_name().to_string());
            }
        }
        let cache = self.cache.clone();
        let bytes = blocking(move || Ok(names.iter().map(|n| cache.file_bytes(n)).sum::<u64>()))
            .await
            .unwrap_or(0);
        self.upkeep.set_dirty_bytes(bytes);
    }

    /// Once a second: upload files kept open and written past the maximum dirty age, count
    /// changed bytes, and evict clean cached data beyond the cache size.
    pub(super) async fn tick(&self) -> FsResult<()> {
        let aged: Vec<Arc<FileData>> = {
            let registry = self.files.lock().await;
            registry.values().filter_map(|w| w.upgrade()).collect()
        };
        for data in aged {
            self.note_direct_writes(&data, DirectWriteCheck::Compare)
                .await?;
            let old = data
                .content
                .lock()
                .await
                .dirty_since()
                .is_some_and(|since| since.elapsed() >= self.config.max_dirty_age);
            if old {
                self.queue_upload(&data, false).await?;
            }
        }
        self.refresh_dirty_bytes().await;
        self.evict().await
    }

    /// Removes clean cached files, least recently used first, until the cache is under its
    /// size. Files open here or named by a pending change stay. The check and the removal happen
    /// under the open-files lock, so no file is opened, written or recorded in the change log
    /// between them (a file removed while a writer reopened it would lose that write).
    async fn evict(&self) -> FsResult<()> {
        let (cache, limit) = (self.cache.clone(), self.config.cache_size);
        let last = self.upkeep.last_count();
        let counted = blocking(move || {
            let free = cache.free_bytes();
            let unchanged = last.is_some_and(|(then, at)| {
                Some(then) == free && at.elapsed() < CACHE_RECOUNT_AT_LEAST_EVERY
            });
            if unchanged {
                return Ok(None);
            }
            Ok(Some((free, cache.eviction_candidates(limit)?)))
        })
        .await?;
        let Some((free, (excess, candidates))) = counted else {
            return Ok(());
        };
        if excess == 0 {
            // Under the size: counted again only once something changed on the cache disk.
            self.upkeep
                .set_last_count(free.map(|free| (free, Instant::now())));
            return Ok(());
        }
        self.evict_among(excess, candidates).await
    }

    /// Makes room on the cache disk for `bytes` more file data: evicts clean cached files not
    /// in use (whatever the cache size), then, while changes are uploading and the store
    /// answers, waits for them to land and become evictable (at most `patience`). Whether
    /// there is room in the end.
    pub(super) async fn make_room(&self, bytes: u64, patience: Duration) -> FsResult<bool> {
        let deadline = Instant::now() + patience;
        loop {
            let cache = self.cache.clone();
            if blocking(move || Ok(cache.room_for(bytes))).await? {
                return Ok(true);
            }
            let cache = self.cache.clone();
            let (_, candidates) = blocking(move || cache.eviction_candidates(0)).await?;
            self.evict_among(bytes + ROOM_SLACK, candidates).await?;
            let cache = self.cache.clone();
            if blocking(move || Ok(cache.room_for(bytes))).await? {
                return Ok(true);
            }
            if self.change_log().is_empty()
                || self.uploads.status().failing
                || Instant::now() >= deadline
            {
                return Ok(false);
            }
            // What waits out its write-back delay is due now: its upload frees the room.
            let _ = self.update_change_log(|j| j.hurry_all()).await;
            let notified = self.progress.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Removes `candidates` not in use, in order, until `excess` bytes are freed. A file may
    /// have been opened since the candidates were listed: whether it is in use is decided here.
    async fn evict_among(&self, mut excess: u64, candidates: Vec<Evictable>) -> FsResult<()> {
        let registry = self.files.lock().await;
        let referenced = self.referenced_cache_files();
        let mut victims = Vec::new();
        for candidate in candidates {
            if excess == 0 {
                break;
            }
            let file = &candidate.file;
            let in_use = registry.get(file).is_some_and(|w| w.strong_count() > 0);
            if in_use || referenced.contains(file) {
                continue;
            }
            excess = excess.saturating_sub(candidate.bytes);
            victims.push(candidate.key);
        }
        let cache = self.cache.clone();
        let removed = blocking(move || victims.iter().try_for_each(|key| cache.remove(key))).await;
        drop(registry);
        removed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cache::Cache;
    use crate::fs::{Filesystem, FsConfig};
    use crate::namespace::ROOT;
    use crate::store::StoreExt;
    use crate::store::memory::MemoryStore;

    /// A file reopened and written after eviction listed it as clean must keep its cache file:
    /// whether a file is in use is decided when it is removed, not when the candidates were
    /// listed (the stress test once lost such a write).
    #[tokio::test]
    async fn eviction_spares_a_file_reopened_after_the_candidates_were_listed() {
        let cache_dir = tempfile::tempdir().unwrap();
        let store = Arc::new(MemoryStore::new());
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let cache = Cache::open(cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(store.clone(), cache, config).unwrap());
        fs.start_uploader();
        let flags = libc::O_WRONLY | libc::O_CREAT;
        let (attr, opened) = fs
            .create(ROOT, "a".as_ref(), 0o644, 0o022, flags, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, b"first").await.unwrap();
        fs.release(opened.fh).await.unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();

        let (excess, candidates) = fs.cache.eviction_candidates(0).unwrap();
        assert!(candidates.iter().any(|c| c.key == "a"), "{candidates:?}");
        let reopened = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
        fs.write(reopened.fh, 0, b"again").await.unwrap();
        fs.evict_among(excess, candidates).await.unwrap();
        fs.release(reopened.fh).await.unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();

        let (_, stored) = store.get_all("a").await.unwrap();
        assert_eq!(&stored[..], b"again");
    }
}
