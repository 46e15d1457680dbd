//! Settling a change once the store answered: done (out of the change log, and the store's new
//! version into the inode, the file's contents and the cache index, under the naming lock), or
//! failed (retried with backoff, or dropped when a newer change of the key covers it); and
//! pacing the uploader by the store's answers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use super::{Applied, STORE_PAUSE_CEILING};
use crate::cache::{Partial, RangeSet};
use crate::error::{FsError, FsResult};
use crate::fs::contents::FileData;
use crate::fs::{Filesystem, blocking};
use crate::journal::{Change, Entry};
use crate::namespace::Remote;
use crate::store::ETag;

impl Filesystem {
    /// Paces the uploader by how the store answered a request: while it does not answer (a
    /// timeout, a refused connection, a 5xx), the next request waits 0.4 s, then twice as long
    /// after each failure up to 30 s, whichever change it is for: a store that is down gets one
    /// request at a time, spaced out, rather than one for every waiting change (thousands, each
    /// failing and logged, after an untar). Failures of requests started before a pause do not
    /// lengthen it; an answer ends it.
    pub(super) fn pace(&self, failed: Option<&FsError>) {
        let mut status = self.uploads.status();
        match failed {
            None => {
                status.store_failures = 0;
                status.paused_until = None;
            }
            Some(FsError::Store(err)) if err.kind().is_retryable() => {
                let now = Instant::now();
                if status.paused_until.is_none_or(|until| until <= now) {
                    status.store_failures += 1;
                    let exponent = status.store_failures.min(8);
                    let pause = Duration::from_millis(200 << exponent).min(STORE_PAUSE_CEILING);
                    status.paused_until = Some(now + pause);
                }
            }
            // The store answered (refused this change), or the trouble is local.
            Some(_) => {}
        }
    }

    /// Records how applying a change went: done (out of the log), or failed (retried later).
    pub(super) async fn settle(&self, entry: Entry, outcome: FsResult<Applied>) {
        let seq = entry.seq;
        match outcome {
            Ok(applied) => {
                if let Applied::Dropped(why) = &applied {
                    tracing::warn!("dropping a change of {}: {why}", entry.key);
                }
                if let Err(err) = self.update_change_log(move |j| j.remove_row(seq)).await {
                    tracing::error!("could not remove an applied change from the log: {err}");
                }
                {
                    // Out of the log and into the inode at once (under the tree's lock), so that
                    // anyone reading both sees the change pending or the store's new version.
                    let mut ns = self.ns();
                    let superseded = {
                        let mut journal = self.change_log();
                        journal.forget(seq);
                        // A newer version of the key waits: the inode there now is that one
                        // (a file renamed over it, say), not the one this change stored.
                        journal
                            .latest(&entry.key)
                            .is_some_and(|newer| newer.change.replaces_object())
                    };
                    if let Applied::Done {
                        stored: Some((kind, etag, size)),
                        ..
                    } = &applied
                        && !superseded
                        && let Some(ino) = ns.find(&entry.key)
                        && let Some(inode) = ns.get_mut(ino)
                        && inode.kind() == *kind
                    {
                        inode.remote = Some(Remote {
                            etag: etag.clone(),
                            size: *size,
                        });
                        inode.checked = Instant::now();
                    }
                }
                self.uploads.attempts().remove(&seq);
                self.health.answered();
                let mut status = self.uploads.status();
                status.failing = false;
                status.permanent = false;
                status.applied_changes += 1;
                if let Applied::Done { bytes, .. } = applied {
                    status.uploaded_bytes += bytes;
                }
            }
            Err(err) => {
                let attempt = {
                    let mut attempts = self.uploads.attempts();
                    let count = attempts.entry(seq).or_insert(0);
                    *count += 1;
                    *count
                };
                let (permanent, ceiling) = match &err {
                    FsError::Store(e) => (!e.kind().is_retryable(), Duration::from_secs(30)),
                    // Local trouble (a full cache disk) clears as soon as space frees.
                    _ => (false, Duration::from_secs(2)),
                };
                let backoff = if permanent {
                    ceiling
                } else {
                    Duration::from_millis(200 * 2u64.saturating_pow(attempt.min(8))).min(ceiling)
                };
                let message = format!("applying a change of {} to the store: {err}", entry.key);
                if permanent {
                    tracing::error!("{message} (kept locally; retrying in {backoff:?})");
                } else {
                    tracing::warn!("{message} (attempt {attempt}; retrying in {backoff:?})");
                }
                {
                    let mut status = self.uploads.status();
                    status.last_error = Some((SystemTime::now(), message));
                    status.failing = true;
                    status.permanent = permanent;
                }
                // A newer put or delete of the same key covers a change that failed: drop it
                // (and its cache file, if nothing else needs it) instead of retrying.
                let covered = self
                    .change_log()
                    .latest(&entry.key)
                    .is_some_and(|newer| newer.seq != seq && newer.change.replaces_object());
                if covered {
                    if let Err(err) = self.update_change_log(move |j| j.remove(seq)).await {
                        tracing::error!("could not drop a covered change from the log: {err}");
                    }
                    if let Change::PutFile { cache_file, .. } = &entry.change {
                        self.discard_if_unneeded(cache_file).await;
                    }
                } else {
                    self.change_log()
                        .retry_later(seq, SystemTime::now() + backoff);
                }
            }
        }
        self.progress.notify_waiters();
    }

    /// Deletes a cache file that no pending change names and no open file uses.
    async fn discard_if_unneeded(&self, cache_file: &str) {
        let registry = self.files.lock().await;
        let open = registry
            .get(cache_file)
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|data| data.opens.load(Ordering::Acquire) > 0);
        if !open && !self.uploads_cache_file(cache_file) {
            self.cache.discard_file(cache_file);
        }
    }

    /// After a file's upload: the file is clean if nothing changed since its snapshot, and its
    /// cache file becomes cached store data again.
    pub(super) async fn after_put(
        &self,
        entry: &Entry,
        cache_file: &str,
        etag: ETag,
        size: u64,
        holder: Option<(Arc<FileData>, u64)>,
        partial: Option<Partial>,
    ) -> FsResult<()> {
        let mut held = match &holder {
            Some((data, _)) => Some(data.content.lock().await),
            None => None,
        };
        // A rename or unlink of the key waits until the cache index has the new version: the
        // index must not take it under a name that has moved on meanwhile.
        let naming = self.naming.read().await;
        let later = self
            .change_log()
            .latest(&entry.key)
            .is_some_and(|e| e.seq != entry.seq);
        let mut clean = holder.is_none() && !later;
        // What the cache file holds of the new version.
        let mut present = partial
            .as_ref()
            .map_or_else(|| RangeSet::full(size), |p| p.changed.clone());
        // A partial file still changed: what it lacks is now the new version's (it was copied
        // there unchanged), so that becomes its base.
        let mut rebased = None;
        let mut moot_records = Vec::new();
        if let (Some((data, generation)), Some(content)) = (&holder, held.as_mut()) {
            let written = data.direct_writers.load(Ordering::Acquire) > 0;
            if content.cache_name() == cache_file {
                let changed_since = content.generation() != *generation;
                moot_records = content.upload_landed(
                    &entry.key,
                    etag.clone(),
                    size,
                    changed_since,
                    !later && !written,
                );
            }
            if content.cache_name() == cache_file
                && content.generation() == *generation
                && !later
                && !written
            {
                present = content.uploaded(etag.clone(), size, partial.is_some());
                clean = true;
            } else if content.cache_name() == cache_file && content.is_partial() {
                rebased = content.rebase(etag.clone(), size.min(data.size.load(Ordering::Acquire)));
            }
        } else if later && let Some(partial) = &partial {
            rebased = Some(Partial {
                etag: etag.clone(),
                base_end: size,
                changed: partial.changed.clone(),
            });
        }
        if let Some(rebased) = rebased {
            let (cache, file) = (self.cache.clone(), cache_file.to_string());
            blocking(move || {
                if cache.partial(&file)?.is_some() {
                    cache.record_partial(&file, &rebased)?;
                }
                Ok(())
            })
            .await?;
        }
        if clean {
            let (cache, key, file, etag) = (
                self.cache.clone(),
                entry.key.clone(),
                cache_file.to_string(),
                etag,
            );
            blocking(move || cache.index_version(&key, &file, &etag, &present)).await?;
        }
        drop((naming, held));
        if let Some((data, _)) = holder {
            self.drop_if_clean(&data).await;
        }
        self.delete_moot_records(moot_records);
        Ok(())
    }

    /// After a renamed file's copy: its cached data (of version `old`) is the new object's.
    pub(super) async fn after_copy(&self, key: &str, old: &ETag, etag: ETag) -> FsResult<()> {
        let data = {
            let ns = self.ns();
            ns.find(key)
                .and_then(|ino| ns.get(ino))
                .and_then(|i| i.file.clone())
        };
        if let Some(data) = data {
            let mut content = data.content.lock().await;
            if let Some(present) = content.copied_as(old, etag.clone()) {
                let (cache, key, file) = (
                    self.cache.clone(),
                    key.to_string(),
                    content.cache_name().to_string(),
                );
                blocking(move || cache.index_version(&key, &file, &etag, &present)).await?;
            }
            return Ok(());
        }
        let (cache, key) = (self.cache.clone(), key.to_string());
        let old = old.clone();
        blocking(move || {
            if let Some(cached) = cache.lookup(&key)?
                && cached.etag == old
            {
                cache.index_version(&key, &cached.file, &etag, &cached.present)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::fs::FsConfig;
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store, StoreExt};

    /// A file renamed over one whose upload is on its way reads as itself after that upload
    /// lands and before its own copy does (the stress test once read the old file's bytes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_renamed_over_one_being_uploaded_reads_as_itself() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        memory
            .put(
                "source",
                Bytes::from_static(b"renamed"),
                PutOptions::default(),
            )
            .await
            .unwrap();
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        faulty.add_latency(Some(Op::Put), Duration::from_millis(300));
        faulty.add_latency(Some(Op::Copy), Duration::from_millis(1500));
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = crate::fs::test_mount(faulty.clone(), config);
        fs.start_uploader();
        fs.lookup(ROOT, "source".as_ref()).await.unwrap();
        let flags = libc::O_WRONLY | libc::O_CREAT;
        let (_, opened) = fs
            .create(ROOT, "target".as_ref(), 0o644, 0o022, flags, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, b"uploading").await.unwrap();
        fs.release(opened.fh).await.unwrap();
        while faulty.calls(Op::Put) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        fs.rename(ROOT, "source".as_ref(), ROOT, "target".as_ref(), false)
            .await
            .unwrap();
        // Left: the copy, and the delete of its source.
        while fs.pending().changes > 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let attr = fs.lookup(ROOT, "target".as_ref()).await.unwrap();
        let reading = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
        let heads = faulty.calls(Op::Head);
        let read = fs.read(reading.fh, 0, 64).await.unwrap();
        assert_eq!(&read[..], b"renamed");
        // Read from the renamed file's version at once: the mount did not take the upload that
        // landed under the name for the renamed file's version, then find out with a HEAD.
        assert_eq!(
            faulty.calls(Op::Head),
            heads,
            "the read had to look the file up again"
        );
        fs.release(reading.fh).await.unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!(&memory.get_all("target").await.unwrap().1[..], b"renamed");
    }
}
