//! The uploader: applies the change log to the store in the background, in order, several
//! changes at once where they touch unrelated keys. A file's contents are uploaded from its cache
//! file itself while the file is marked as uploading: a write meanwhile first moves the file to a
//! copy of its own (copy on write), so the object is always a version the file really had, even
//! while the application goes on writing, and a file no one writes during its upload is never
//! copied. A file the mount holds no state for (after a restart) is uploaded from a snapshot.
//! Retryable store errors are retried with backoff for as long as it takes; the changes wait
//! safely on local disk meanwhile.
//!
//! Also here: waiting for changes to reach the store (fsync, flush, unmount), the figures a
//! report shows, and the periodic work (uploading files kept open and written, evicting clean
//! cached data beyond the cache size).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use super::direct::Look;
use super::{FileData, Filesystem, blocking, read_at};
use crate::attrs::{Attrs, Kind};
use crate::cache::{Evictable, Partial, RangeSet};
use crate::error::{FsError, FsResult};
use crate::journal::{Change, Entry};
use crate::namespace::Remote;
use crate::store::{ETag, ErrorKind, GetOptions, PartSource, PutCondition, PutOptions, StoreError};

/// A file's contents taken for an upload.
struct Snapshot {
    /// Opened before anything could replace it (see [`Filesystem::copy_aside`]).
    file: std::fs::File,
    path: PathBuf,
    /// Held while the upload reads the cache file itself (see [`Filesystem::copy_aside`]); None
    /// for a copy, removed after the upload.
    reading: Option<Arc<()>>,
    size: u64,
    /// The open file it was taken from, and its generation then.
    holder: Option<(Arc<FileData>, u64)>,
    /// For a partial file: where the bytes it lacks come from.
    partial: Option<Partial>,
}

/// Copies the `spans` of `source` (below `size`) into a new file `target` of `size` bytes,
/// leaving the rest as holes; returns `size`.
fn copy_spans(source: &Path, target: &Path, size: u64, spans: &RangeSet) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    let from = std::fs::File::open(source)?;
    let to = std::fs::File::create(target)?;
    to.set_len(size)?;
    let mut buffer = vec![0; CHUNK as usize];
    for span in spans.spans() {
        let mut at = span.start;
        while at < span.end.min(size) {
            let len = (span.end.min(size) - at).min(CHUNK) as usize;
            from.read_exact_at(&mut buffer[..len], at)?;
            to.write_all_at(&buffer[..len], at)?;
            at += len as u64;
        }
    }
    Ok(size)
}

/// Copies cache file `from` to `to`: only its `spans` for a partial file (the rest holes),
/// else all of it. Returns the copy's length; a failed copy leaves nothing behind.
pub(super) fn copy_cache_file(
    from: &Path,
    to: &Path,
    spans: Option<&RangeSet>,
) -> std::io::Result<u64> {
    let copied = match spans {
        Some(spans) => {
            std::fs::metadata(from).and_then(|meta| copy_spans(from, to, meta.len(), spans))
        }
        None => std::fs::copy(from, to),
    };
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

/// The longest the uploader waits between requests to a store that does not answer.
const STORE_PAUSE_CEILING: Duration = Duration::from_secs(30);

/// The most deletes one request applies (S3's limit for DeleteObjects).
const DELETE_BATCH: usize = 1000;

/// The longest the uploader trusts an unchanged cache disk to mean an unchanged cache.
const CACHE_RECOUNT_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

/// Evicted beyond what a write or read needs, so the next ones find room.
const ROOM_SLACK: u64 = 8 << 20;

/// The largest part S3 takes (a copied part may be this large).
const MAX_PART: u64 = 5 << 30;

/// The parts of a multipart upload of `size` bytes: ranges of `part_size`, and for a partial
/// file, whether each is copied from its base version inside the store. Neighbouring parts the
/// file holds no byte of become one copied part (up to [`MAX_PART`]), so a small change to a
/// large file takes a few requests, not one per part.
fn plan_parts(size: u64, part_size: u64, partial: Option<&Partial>) -> Vec<(Range<u64>, bool)> {
    let mut plan: Vec<(Range<u64>, bool)> = Vec::new();
    for start in (0..size).step_by(part_size as usize) {
        let range = start..(start + part_size).min(size);
        let copied = partial.is_some_and(|p| p.from_base(range.clone()) == [range.clone()]);
        match plan.last_mut() {
            Some((last, true)) if copied && range.end - last.start <= MAX_PART => {
                last.end = range.end;
            }
            _ => plan.push((range, copied)),
        }
    }
    plan
}

/// How the uploader is doing, for reports and `cairn flush`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last failure to apply a change, and when.
    pub last_error: Option<(SystemTime, String)>,
    /// Whether the last attempt failed (cleared by the next success).
    pub failing: bool,
    /// Whether that failure was one that retrying will not fix by itself (access denied,
    /// bucket gone): it needs an operator.
    pub permanent: bool,
    pub applied_changes: u64,
    pub uploaded_bytes: u64,
    /// Requests in a row the store failed to answer (timeouts, refusals, 5xx), counted once per
    /// pause; and until when the uploader waits before its next request (see `pace`).
    store_failures: u32,
    paused_until: Option<Instant>,
}

/// What is not yet in the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending {
    pub changes: usize,
    /// Bytes of file contents waiting for upload.
    pub bytes: u64,
    /// When the oldest waiting change was made due.
    pub oldest: Option<SystemTime>,
}

/// What applying a change came to.
enum Applied {
    Done {
        bytes: u64,
        /// What the store now holds at the key, for the inode there.
        stored: Option<(Kind, ETag, u64)>,
    },
    /// Nothing to apply any more (its file or source is gone); said why.
    Moot(String),
}

impl Filesystem {
    /// Starts applying the change log in the background (on the current tokio runtime).
    pub fn start_uploader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let fs = Arc::clone(self);
        tokio::spawn(async move { fs.run_uploader().await })
    }

    async fn run_uploader(self: Arc<Self>) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut last_tick = Instant::now();
        loop {
            // While the store is failing, one change at a time probes it: no point in eight
            // snapshots and eight failures at once.
            let failing = self.status().failing;
            let limit = if failing {
                1
            } else {
                self.config.uploads_in_flight
            };
            let room = limit.saturating_sub(in_flight.load(Ordering::Acquire));
            let paused_until = self.status().paused_until.filter(|t| *t > Instant::now());
            let (mut batch, mut deletes) = (Vec::new(), Vec::new());
            if room > 0 && paused_until.is_none() && self.may_upload() {
                let now = SystemTime::now();
                let mut journal = self.journal();
                // Deletes due together go in one request (an `rm -r` records hundreds at once).
                let most = if failing { 1 } else { DELETE_BATCH };
                deletes = journal.take_runnable_deletes(now, most);
                let room = room - usize::from(!deletes.is_empty());
                batch = journal.take_runnable(now, room);
            }
            if deletes.len() == 1 {
                batch.append(&mut deletes);
            }
            if !deletes.is_empty() {
                let fs = Arc::clone(&self);
                self.spawn_counted(&in_flight, async move { fs.apply_deletes(deletes).await });
            }
            for entry in batch {
                let fs = Arc::clone(&self);
                self.spawn_counted(&in_flight, async move {
                    let outcome = fs.apply(&entry).await;
                    fs.pace(outcome.as_ref().err());
                    fs.settle(entry, outcome).await;
                });
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                if let Err(err) = self.tick().await {
                    tracing::warn!("cache upkeep: {err}");
                }
            }
            let until_due = self
                .journal()
                .next_due()
                .and_then(|due| due.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(1));
            let until_due = paused_until.map_or(until_due, |t| t - Instant::now());
            let wait = until_due.clamp(Duration::from_millis(5), Duration::from_secs(1));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Applies one change to the store.
    async fn apply(&self, entry: &Entry) -> FsResult<Applied> {
        let key = entry.key.as_str();
        let seq = entry.seq;
        self.log(move |j| j.mark_started(seq)).await?;
        match &entry.change {
            Change::PutFile { cache_file, attrs } => {
                let (cache, name) = (self.cache.clone(), cache_file.clone());
                if !blocking(move || Ok(cache.room_for_copy_of(&name))).await? {
                    return self.put_in_place(entry, cache_file, (*attrs).into()).await;
                }
                let snapshot = match self.snapshot(cache_file).await {
                    Err(err) if err.errno() == libc::ENOSPC => {
                        return self.put_in_place(entry, cache_file, (*attrs).into()).await;
                    }
                    other => other?,
                };
                let Some(Snapshot {
                    file,
                    path: snapshot,
                    reading,
                    size,
                    holder,
                    partial,
                }) = snapshot
                else {
                    return Ok(Applied::Moot(format!("the cache file of {key} is gone")));
                };
                let put = self
                    .put_file(key, file, size, (*attrs).into(), partial.as_ref())
                    .await;
                if reading.is_none() {
                    let path = snapshot.clone();
                    let _ = blocking(move || Ok(std::fs::remove_file(path)?)).await;
                }
                drop(reading);
                let etag = put?;
                self.after_put(entry, cache_file, etag.clone(), size, holder, partial)
                    .await?;
                Ok(Applied::Done {
                    bytes: size,
                    stored: Some((Kind::File, etag, size)),
                })
            }
            Change::PutDir { attrs } => {
                let attrs: Attrs = (*attrs).into();
                let marker = format!("{key}/");
                let put = self
                    .store
                    .put(
                        &marker,
                        Bytes::new(),
                        PutOptions::with_metadata(attrs.encode()),
                    )
                    .await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: Some((Kind::Dir, put.etag, 0)),
                })
            }
            Change::PutSymlink { target, attrs } => {
                let attrs: Attrs = (*attrs).into();
                let body = Bytes::from(target.clone().into_bytes());
                let put = self
                    .store
                    .put(key, body, PutOptions::with_metadata(attrs.encode()))
                    .await?;
                let length = target.len() as u64;
                Ok(Applied::Done {
                    bytes: length,
                    stored: Some((Kind::Symlink, put.etag, length)),
                })
            }
            Change::Copy {
                from,
                etag,
                size,
                attrs,
            } => {
                let attrs: Attrs = (*attrs).into();
                match self.store.copy(from, key, Some(attrs.encode())).await {
                    Ok(put) => {
                        self.after_copy(key, &ETag(etag.clone()), put.etag.clone())
                            .await?;
                        Ok(Applied::Done {
                            bytes: 0,
                            stored: Some((Kind::File, put.etag, *size)),
                        })
                    }
                    Err(err) if err.kind() == ErrorKind::NotFound => Ok(Applied::Moot(format!(
                        "{from}, renamed to {key}, is gone from the store"
                    ))),
                    Err(err) => Err(err.into()),
                }
            }
            Change::SetAttrs { kind, attrs } => {
                let attrs: Attrs = (*attrs).into();
                let result = match Kind::from(*kind) {
                    Kind::Dir => {
                        let marker = format!("{key}/");
                        self.store
                            .put(
                                &marker,
                                Bytes::new(),
                                PutOptions::with_metadata(attrs.encode()),
                            )
                            .await
                    }
                    Kind::File | Kind::Symlink => {
                        self.store.copy(key, key, Some(attrs.encode())).await
                    }
                };
                match result {
                    Ok(_) => Ok(Applied::Done {
                        bytes: 0,
                        stored: None,
                    }),
                    Err(err) if err.kind() == ErrorKind::NotFound => {
                        Ok(Applied::Moot(format!("{key} is gone from the store")))
                    }
                    Err(err) => Err(err.into()),
                }
            }
            Change::Delete => {
                self.store.delete(key).await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                })
            }
            Change::DeleteDir => {
                self.store.delete(&format!("{key}/")).await?;
                Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                })
            }
        }
    }

    /// Runs `work` as one of the uploader's requests in flight, and wakes the uploader after.
    fn spawn_counted(
        self: &Arc<Self>,
        in_flight: &Arc<AtomicUsize>,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        in_flight.fetch_add(1, Ordering::AcqRel);
        let (fs, counter) = (Arc::clone(self), Arc::clone(in_flight));
        tokio::spawn(async move {
            work.await;
            counter.fetch_sub(1, Ordering::AcqRel);
            fs.wake.notify_one();
        });
    }

    /// Applies deletes of several keys with one request, and settles each.
    async fn apply_deletes(&self, deletes: Vec<Entry>) {
        let keys: Vec<String> = deletes.iter().map(|e| e.key.clone()).collect();
        let deleted = self.store.delete_many(&keys).await;
        self.pace(
            deleted
                .as_ref()
                .err()
                .map(|e| FsError::Store(e.clone()))
                .as_ref(),
        );
        if let Err(err) = &deleted
            && !err.kind().is_retryable()
        {
            // A store without multi-object deletes (or refusing this one): one at a time.
            tracing::warn!("deleting {} keys in one request: {err}", keys.len());
            for entry in deletes {
                let outcome = self.apply(&entry).await;
                self.settle(entry, outcome).await;
            }
            return;
        }
        for entry in deletes {
            let outcome = match &deleted {
                Ok(()) => Ok(Applied::Done {
                    bytes: 0,
                    stored: None,
                }),
                Err(err) => Err(FsError::Store(err.clone())),
            };
            self.settle(entry, outcome).await;
        }
    }

    /// Paces the uploader by how the store answered a request: while it does not answer (a
    /// timeout, a refused connection, a 5xx), the next request waits 0.4 s, then twice as long
    /// after each failure up to 30 s, whichever change it is for: a store that is down gets one
    /// request at a time, spaced out, rather than one for every waiting change (thousands, each
    /// failing and logged, after an untar). Failures of requests started before a pause do not
    /// lengthen it; an answer ends it.
    fn pace(&self, failed: Option<&FsError>) {
        let mut status = self.status();
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
    async fn settle(&self, entry: Entry, outcome: FsResult<Applied>) {
        let seq = entry.seq;
        match outcome {
            Ok(applied) => {
                if let Applied::Moot(why) = &applied {
                    tracing::warn!("dropping a change of {}: {why}", entry.key);
                }
                if let Err(err) = self.log(move |j| j.remove_row(seq)).await {
                    tracing::error!("could not remove an applied change from the log: {err}");
                }
                {
                    // Out of the log and into the inode at once (under the tree's lock), so that
                    // anyone reading both sees the change pending or the store's new version.
                    let mut ns = self.ns();
                    let superseded = {
                        let mut journal = self.journal();
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
                self.attempts().remove(&seq);
                self.store_answered();
                let mut status = self.status();
                status.failing = false;
                status.permanent = false;
                status.applied_changes += 1;
                if let Applied::Done { bytes, .. } = applied {
                    status.uploaded_bytes += bytes;
                }
            }
            Err(err) => {
                let attempt = {
                    let mut attempts = self.attempts();
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
                    let mut status = self.status();
                    status.last_error = Some((SystemTime::now(), message));
                    status.failing = true;
                    status.permanent = permanent;
                }
                // A newer put or delete of the same key covers a change that failed: drop it
                // (and its cache file, if nothing else needs it) instead of retrying.
                let covered = self
                    .journal()
                    .latest(&entry.key)
                    .is_some_and(|newer| newer.seq != seq && newer.change.replaces_object());
                if covered {
                    if let Err(err) = self.log(move |j| j.remove(seq)).await {
                        tracing::error!("could not drop a covered change from the log: {err}");
                    }
                    if let Change::PutFile { cache_file, .. } = &entry.change {
                        self.discard_if_unneeded(cache_file).await;
                    }
                } else {
                    self.journal().retry_later(seq, SystemTime::now() + backoff);
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

    fn attempts(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, u32>> {
        self.attempts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every write to the store for good (the lease was taken over): pending changes stay
    /// in the cache, writes fail with EROFS, and waits for uploads fail with `why`.
    pub fn fence(&self, why: String) {
        tracing::error!("{why}: no more uploads from this mount; its changes stay in the cache");
        {
            let mut status = self.status();
            status.last_error = Some((SystemTime::now(), why.clone()));
            status.failing = true;
            status.permanent = true;
        }
        *self.fenced.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.progress.notify_waiters();
        self.wake.notify_one();
    }

    /// With a lease: lets the uploader write to the store until `deadline` (the lease's expiry
    /// as of its last renewal, less a margin). Past it, uploads wait for the next renewal, so a
    /// mount that stalled past its lease writes nothing before it learns whether it lost it.
    pub fn allow_uploads_until(&self, deadline: Instant) {
        *self.uploads_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        self.wake.notify_one();
    }

    fn may_upload(&self) -> bool {
        let until = *self.uploads_until.lock().unwrap_or_else(|p| p.into_inner());
        self.fenced().is_none() && until.is_none_or(|until| Instant::now() < until)
    }

    /// Why this mount may no longer write to the store, if so.
    pub fn fenced(&self) -> Option<String> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How the uploader is doing.
    pub fn upload_status(&self) -> Status {
        self.status().clone()
    }

    /// What is not yet in the store, with the changed bytes counted anew.
    pub async fn pending_now(&self) -> Pending {
        self.refresh_dirty_bytes().await;
        self.pending()
    }

    /// What is not yet in the store (changed bytes as of the uploader's last count, at most a
    /// second ago).
    pub fn pending(&self) -> Pending {
        let journal = self.journal();
        Pending {
            changes: journal.len(),
            bytes: self.dirty_bytes.load(Ordering::Acquire),
            oldest: journal.entries().map(|e| e.not_before).min(),
        }
    }

    /// The contents to upload: for a file the mount holds state for, the cache file itself,
    /// marked as uploading (see [`Filesystem::copy_aside`]); otherwise a copy taken while no one
    /// can open the file. None if the cache file is gone. A partial file's snapshot holds only
    /// its own bytes; the rest stay in the store.
    async fn snapshot(&self, cache_file: &str) -> FsResult<Option<Snapshot>> {
        let registry = self.files.lock().await;
        let holder = registry.get(cache_file).and_then(std::sync::Weak::upgrade);
        let source = self.cache.path_of(cache_file);
        if let Some(data) = holder {
            let mut content = data.content.lock().await;
            drop(registry);
            self.upload_reads(&data, &mut content)?;
            if data.direct_writers.load(Ordering::Acquire) > 0 {
                let generation = content.generation;
                drop(content);
                let (file, path, size) = self.settled_copy(source).await?;
                return Ok(Some(Snapshot {
                    file,
                    path,
                    reading: None,
                    size,
                    holder: Some((data, generation)),
                    partial: None,
                }));
            }
            let path = source.clone();
            let file = blocking(move || Ok(std::fs::File::open(path)?)).await?;
            return Ok(Some(Snapshot {
                file,
                path: source,
                reading: Some(Arc::clone(&content.upload_readers)),
                size: data.size.load(Ordering::Acquire),
                partial: content.partial(),
                holder: Some((Arc::clone(&data), content.generation)),
            }));
        }
        let (cache, name) = (self.cache.clone(), cache_file.to_string());
        let partial = blocking(move || cache.partial(&name)).await?;
        let target = self.cache.snapshot_path();
        let (from, to, spans) = (source, target.clone(), partial.clone());
        let copied = blocking(move || {
            let copied = copy_cache_file(&from, &to, spans.as_ref().map(|p| &p.changed));
            match copied.and_then(|size| Ok((std::fs::File::open(&to)?, size))) {
                Ok(opened) => Ok(Some(opened)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => {
                    let _ = std::fs::remove_file(&to);
                    Err(e.into())
                }
            }
        })
        .await?;
        drop(registry);
        Ok(copied.map(|(file, size)| Snapshot {
            file,
            path: target,
            reading: None,
            size,
            holder: None,
            partial,
        }))
    }

    /// With no room on the cache disk for a snapshot, uploads the cache file itself, holding the
    /// file still (its writers, or with no one writing, any open) until the store has it.
    async fn put_in_place(
        &self,
        entry: &Entry,
        cache_file: &str,
        attrs: Attrs,
    ) -> FsResult<Applied> {
        let registry = self.files.lock().await;
        let holder = registry.get(cache_file).and_then(std::sync::Weak::upgrade);
        let path = self.cache.path_of(cache_file);
        let opened = blocking(move || {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        });
        let Ok((file, size)) = opened.await else {
            return Ok(Applied::Moot(format!(
                "the cache file of {} is gone",
                entry.key
            )));
        };
        let (etag, generation, partial) = match &holder {
            Some(data) => {
                let content = data.content.lock().await;
                drop(registry);
                if data.direct_writers.load(Ordering::Acquire) > 0 {
                    return Err(FsError::Io(std::io::Error::other(format!(
                        "no room on the cache disk to copy {} while it is written; \
                         it is uploaded once closed, or once there is room",
                        entry.key
                    ))));
                }
                let partial = content.partial();
                let etag = self
                    .put_file(&entry.key, file, size, attrs, partial.as_ref())
                    .await?;
                (etag, content.generation, partial)
            }
            None => {
                let (cache, name) = (self.cache.clone(), cache_file.to_string());
                let partial = blocking(move || cache.partial(&name)).await?;
                let etag = self
                    .put_file(&entry.key, file, size, attrs, partial.as_ref())
                    .await?;
                drop(registry);
                (etag, 0, partial)
            }
        };
        let holder = holder.map(|data| (data, generation));
        let etag_for_inode = etag.clone();
        self.after_put(entry, cache_file, etag, size, holder, partial)
            .await?;
        Ok(Applied::Done {
            bytes: size,
            stored: Some((Kind::File, etag_for_inode, size)),
        })
    }

    /// Uploads `size` bytes of `file` to `key`: one put, or a multipart upload with
    /// parts in parallel for large files. For a partial file, a part it holds none of is copied
    /// from the base version inside the store, and the base's bytes of a part it holds some of
    /// are fetched.
    async fn put_file(
        &self,
        key: &str,
        file: std::fs::File,
        size: u64,
        attrs: Attrs,
        partial: Option<&Partial>,
    ) -> FsResult<ETag> {
        let metadata = attrs.encode();
        let file = Arc::new(file);
        if size <= self.config.single_put_limit {
            let body = self.read_part(key, &file, 0..size, partial).await?;
            let put = self
                .store
                .put(key, body, PutOptions::with_metadata(metadata))
                .await?;
            return Ok(put.etag);
        }
        let plan = plan_parts(size, self.config.part_size, partial);
        let upload = self.store.start_multipart(key, metadata).await?;
        let parts = stream::iter(plan.into_iter().zip(1u32..))
            .map(|((range, copied), number)| {
                let (file, upload) = (Arc::clone(&file), &upload);
                async move {
                    if let Some(partial) = partial
                        && copied
                    {
                        let source = PartSource {
                            key: key.to_string(),
                            range,
                            if_match: Some(partial.etag.clone()),
                        };
                        let part = self
                            .store
                            .upload_part_copy(key, upload, number, &source)
                            .await?;
                        return Ok::<_, FsError>(part);
                    }
                    let body = self.read_part(key, &file, range, partial).await?;
                    let part = self.store.upload_part(key, upload, number, body).await?;
                    Ok::<_, FsError>(part)
                }
            })
            .buffered(self.config.concurrency)
            .try_collect::<Vec<_>>()
            .await;
        let completed = match parts {
            Ok(parts) => self
                .store
                .complete_multipart(key, &upload, parts, PutCondition::Always)
                .await
                .map_err(FsError::from),
            Err(err) => Err(err),
        };
        match completed {
            Ok(put) => Ok(put.etag),
            Err(err) => {
                let _ = self.store.abort_multipart(key, &upload).await;
                Err(err)
            }
        }
    }

    /// The bytes `range` of a file to upload: from its snapshot, and for a partial file, the
    /// base version's bytes where the snapshot has none.
    async fn read_part(
        &self,
        key: &str,
        file: &Arc<std::fs::File>,
        range: std::ops::Range<u64>,
        partial: Option<&Partial>,
    ) -> FsResult<Bytes> {
        let file = Arc::clone(file);
        let local = range.clone();
        let mut body = blocking(move || read_at(&file, local)).await?;
        for gap in partial
            .map(|p| p.from_base(range.clone()))
            .unwrap_or_default()
        {
            let options = GetOptions {
                range: Some(gap.clone()),
                if_match: partial.map(|p| p.etag.clone()),
            };
            let got = self.store.get(key, options).await?;
            if got.range != gap {
                return Err(FsError::Store(StoreError::new(
                    ErrorKind::PreconditionFailed,
                    format!("{key}: the store gave bytes {:?} of {gap:?}", got.range),
                )));
            }
            let at = (gap.start - range.start) as usize;
            body[at..at + got.body.len()].copy_from_slice(&got.body);
        }
        Ok(Bytes::from(body))
    }

    /// After a file's upload: the file is clean if nothing changed since its snapshot, and its
    /// cache file becomes cached store data again.
    async fn after_put(
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
            .journal()
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
        if let (Some((data, generation)), Some(content)) = (&holder, held.as_mut()) {
            let written = data.direct_writers.load(Ordering::Acquire) > 0;
            if content.cache_name == cache_file
                && content.generation == *generation
                && !later
                && !written
            {
                content.dirty = false;
                content.etag = Some(etag.clone());
                content.remote_limit = size;
                if partial.is_none() {
                    content.present = RangeSet::full(size);
                }
                present = content.present.clone();
                content.kernel_cached = Some(etag.clone());
                content.dirty_since = None;
                clean = true;
            } else if content.cache_name == cache_file && content.partial().is_some() {
                content.etag = Some(etag.clone());
                content.remote_limit = size.min(data.size.load(Ordering::Acquire));
                rebased = content.partial();
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
            blocking(move || cache.record(&key, &file, &etag, &present)).await?;
        }
        drop((naming, held));
        if let Some((data, _)) = holder {
            self.drop_if_clean(&data).await;
        }
        Ok(())
    }

    /// After a renamed file's copy: its cached data (of version `old`) is the new object's.
    async fn after_copy(&self, key: &str, old: &ETag, etag: ETag) -> FsResult<()> {
        let data = {
            let ns = self.ns();
            ns.find(key)
                .and_then(|ino| ns.get(ino))
                .and_then(|i| i.file.clone())
        };
        if let Some(data) = data {
            let mut content = data.content.lock().await;
            if !content.dirty && content.etag.as_ref() == Some(old) {
                content.etag = Some(etag.clone());
                let (cache, key, file, present) = (
                    self.cache.clone(),
                    key.to_string(),
                    content.cache_name.clone(),
                    content.present.clone(),
                );
                blocking(move || cache.record(&key, &file, &etag, &present)).await?;
            }
            return Ok(());
        }
        let (cache, key) = (self.cache.clone(), key.to_string());
        let old = old.clone();
        blocking(move || {
            if let Some(cached) = cache.lookup(&key)?
                && cached.etag == old
            {
                cache.record(&key, &cached.file, &etag, &cached.present)?;
            }
            Ok(())
        })
        .await
    }

    /// Waits until the change `seq`, and every change before it, is in the store.
    pub async fn wait_applied(&self, seq: u64) -> FsResult<()> {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.journal().pending_up_to(seq) {
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
            if data.content.lock().await.dirty {
                self.queue_upload(&data, false).await?;
            }
        }
        if let Err(err) = self.log(|j| j.hurry_all()).await {
            // A full cache disk: the changes still go, after their write-back delay.
            tracing::warn!("could not make every change due now: {err}");
        }
        let deadline = limit.map(|l| Instant::now() + l);
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let left = self.journal().len();
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

    /// Writers wait here while changed data fills the cache and uploads can make room.
    pub(super) async fn wait_for_room(&self) {
        loop {
            let full = self.dirty_bytes.load(Ordering::Acquire) > self.config.cache_size;
            if !full || self.journal().is_empty() {
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
    async fn refresh_dirty_bytes(&self) {
        let mut names = self.referenced_cache_files();
        for data in self.files.lock().await.values().filter_map(|w| w.upgrade()) {
            if let Ok(content) = data.content.try_lock()
                && content.dirty
            {
                names.insert(content.cache_name.clone());
            }
        }
        let cache = self.cache.clone();
        let bytes = blocking(move || Ok(names.iter().map(|n| cache.file_bytes(n)).sum::<u64>()))
            .await
            .unwrap_or(0);
        self.dirty_bytes.store(bytes, Ordering::Release);
    }

    /// Once a second: upload files kept open and written past the maximum dirty age, count
    /// changed bytes, and evict clean cached data beyond the cache size.
    async fn tick(&self) -> FsResult<()> {
        let aged: Vec<Arc<FileData>> = {
            let registry = self.files.lock().await;
            registry.values().filter_map(|w| w.upgrade()).collect()
        };
        for data in aged {
            self.note_direct_writes(&data, Look::Compare).await?;
            let old = data
                .content
                .lock()
                .await
                .dirty_since
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
        let last = *self
            .last_cache_count
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
            *self
                .last_cache_count
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = free.map(|free| (free, Instant::now()));
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
            if self.journal().is_empty() || self.status().failing || Instant::now() >= deadline {
                return Ok(false);
            }
            // What waits out its write-back delay is due now: its upload frees the room.
            let _ = self.log(|j| j.hurry_all()).await;
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
    use super::*;
    use crate::cache::Cache;
    use crate::fs::FsConfig;
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{ETag, PutOptions, Store, StoreExt};

    const MIB: u64 = 1 << 20;

    #[test]
    fn unchanged_neighbouring_parts_are_copied_as_one() {
        let mut changed = RangeSet::default();
        changed.insert(20 * MIB..20 * MIB + 16);
        let partial = Partial {
            etag: ETag("\"base\"".into()),
            base_end: 64 * MIB,
            changed,
        };
        let plan = plan_parts(70 * MIB, 8 * MIB, Some(&partial));
        assert_eq!(
            plan,
            [
                (0..16 * MIB, true),
                (16 * MIB..24 * MIB, false),
                (24 * MIB..64 * MIB, true),
                (64 * MIB..70 * MIB, false),
            ]
        );
        let whole = plan_parts(20 * MIB, 8 * MIB, None);
        assert_eq!(
            whole,
            [
                (0..8 * MIB, false),
                (8 * MIB..16 * MIB, false),
                (16 * MIB..20 * MIB, false)
            ]
        );
    }

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

    /// Creates files `f0`, `f1`... in the root, each holding "x", and closes them.
    async fn write_files(fs: &Filesystem, count: usize) {
        let flags = libc::O_WRONLY | libc::O_CREAT;
        for n in 0..count {
            let name = format!("f{n}");
            let (_, opened) = fs
                .create(ROOT, name.as_ref(), 0o644, 0o022, flags, 0, 0)
                .await
                .unwrap();
            fs.write(opened.fh, 0, b"x").await.unwrap();
            fs.release(opened.fh).await.unwrap();
        }
    }

    /// While the store does not answer, the uploader sends one request at a time, spaced out,
    /// not one for each of the 50 waiting changes; everything lands once it answers again.
    #[tokio::test]
    async fn a_store_that_does_not_answer_gets_requests_spaced_out() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let away = StoreError::new(ErrorKind::Unavailable, "connection refused");
        faulty.fail_next(Some(Op::Put), 10_000, away);
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = crate::fs::test_mount(faulty.clone(), config);
        fs.start_uploader();
        write_files(&fs, 50).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tried = faulty.calls(Op::Put);
        // The first requests in flight, then one at 0.4 s and one at 1.2 s.
        assert!(tried <= 12, "{tried} PUTs in 1.5 s to a store that is away");

        faulty.clear();
        fs.drain(Some(Duration::from_secs(30))).await.unwrap();
        assert_eq!(memory.list_all("", false).await.unwrap().objects.len(), 50);
    }

    /// Deletes due together (an `rm -r`) reach the store in one request, not one each.
    #[tokio::test]
    async fn deletes_due_together_go_in_one_request() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let cache = Cache::open(cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(faulty.clone(), cache, config).unwrap());
        fs.start_uploader();
        write_files(&fs, 50).await;
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!(memory.list_all("", false).await.unwrap().objects.len(), 50);

        // Held back while the files are removed, as a busy uploader would be.
        fs.allow_uploads_until(Instant::now());
        for n in 0..50 {
            fs.unlink(ROOT, format!("f{n}").as_ref()).await.unwrap();
        }
        fs.allow_uploads_until(Instant::now() + Duration::from_secs(60));
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert!(memory.list_all("", false).await.unwrap().objects.is_empty());
        assert_eq!(faulty.calls(Op::Delete), 0);
        assert_eq!(faulty.calls(Op::DeleteMany), 1);
    }

    /// The upload reads the cache file itself; a write while it does moves the file to a copy
    /// first, so the store gets the version of the close, whole, and then the new one; the
    /// uploaded file is never copied when no one writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_the_upload_of_a_file_goes_to_a_copy() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        faulty.add_latency(Some(Op::UploadPart), Duration::from_millis(150));
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            writeback_delay: Duration::from_secs(2),
            single_put_limit: 8 * MIB,
            concurrency: 1,
            ..FsConfig::default()
        };
        let cache = Cache::open(cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(faulty.clone(), cache, config).unwrap());
        fs.start_uploader();
        let size = 40 * MIB as usize;
        let flags = libc::O_WRONLY | libc::O_CREAT;
        let (attr, opened) = fs
            .create(ROOT, "f".as_ref(), 0o644, 0o022, flags, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, &vec![b'a'; size]).await.unwrap();
        fs.release(opened.fh).await.unwrap();
        let cache_files = || {
            std::fs::read_dir(cache_dir.path().join("data"))
                .unwrap()
                .count()
        };
        let before = cache_files();
        while faulty.calls(Op::UploadPart) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read_dir(cache_dir.path().join("snapshots"))
                .unwrap()
                .count(),
            0,
            "the upload copied the file"
        );

        // The first and the last part change while the upload reads the first ones.
        let reopened = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
        fs.write(reopened.fh, 0, b"z").await.unwrap();
        fs.write(reopened.fh, size as u64 - 1, b"z").await.unwrap();
        fs.release(reopened.fh).await.unwrap();
        // The second upload waits out the write-back delay: the store holds the first for 2 s.
        let first = loop {
            match memory.get_all("f").await {
                Ok((_, body)) => break body,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert!(
            first.iter().all(|b| *b == b'a'),
            "the first upload is not the version of the first close"
        );
        assert_eq!(
            cache_files(),
            before,
            "the copy took the cache file's place"
        );

        fs.drain(Some(Duration::from_secs(30))).await.unwrap();
        let (_, last) = memory.get_all("f").await.unwrap();
        let mut expected = vec![b'a'; size];
        expected[0] = b'z';
        expected[size - 1] = b'z';
        assert!(
            last[..] == expected[..],
            "the store lacks the second version"
        );
        let again = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(&fs.read(again.fh, 0, 2).await.unwrap()[..], b"za");
    }
}
