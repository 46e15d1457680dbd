//! A file's contents while it is open or changed: its cache file, which of its bytes that holds,
//! and where the rest come from. This module owns the rules of a file's state: its fields are
//! private, and every change of state is one method here, named after what happened (a write,
//! a truncation, an upload that landed, a new version in the store...). Callers hold the file's
//! content lock (a `tokio::sync::Mutex`) around each.
//!
//! The states, in short: *clean* (the cache file holds some bytes of the store's version
//! `etag`, the rest below `remote_limit` are fetched on demand); *dirty and whole* (the cache
//! file is the file, `0..size` all present); *dirty and partial* (a large stored file changed
//! before it was all cached: the bytes in `changed` are its own, the rest below `remote_limit`
//! still those of its base version `etag`, see [`FileContents::partial`]).

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use super::direct::Routes;
use super::readahead::InFlight;
use crate::cache::{Partial, RangeSet};
use crate::fsync_log::Delta;
use crate::store::ETag;

/// The contents of one file while it is open or changed: a cache file and what it holds.
#[derive(Debug)]
pub struct FileData {
    pub(super) ino: u64,
    pub(super) content: tokio::sync::Mutex<FileContents>,
    pub(super) size: AtomicU64,
    pub(super) opens: AtomicUsize,
    /// Handles through which the kernel writes the cache file itself (changed under the
    /// content lock; read without it to know whether attributes must be looked up there).
    pub(super) direct_writers: AtomicUsize,
}

impl FileData {
    pub(super) fn new(ino: u64, contents: FileContents, size: u64) -> Self {
        Self {
            ino,
            content: tokio::sync::Mutex::new(contents),
            size: AtomicU64::new(size),
            opens: AtomicUsize::new(0),
            direct_writers: AtomicUsize::new(0),
        }
    }
}

/// A file's cache file and what it holds (see the module doc for the states).
#[derive(Debug)]
pub(super) struct FileContents {
    cache_name: String,
    file: Arc<File>,
    /// Valid bytes of the cache file (when dirty and whole, all of `0..size`).
    present: RangeSet,
    /// The store version the clean bytes are from (of a partial file: its base version).
    etag: Option<ETag>,
    /// Bytes at or past this offset never come from the store (truncated, or written past).
    remote_limit: u64,
    /// Differs from the store (changed here and not yet uploaded).
    dirty: bool,
    /// Counts changes; the upload of a snapshot cleans the file only if none came after it.
    generation: u64,
    /// The generation last recorded in the change log.
    queued_generation: u64,
    /// When the file first changed since its last upload was queued.
    dirty_since: Option<Instant>,
    /// The version the kernel's page cache holds, from the last open.
    kernel_cached: Option<ETag>,
    /// Of a partial file: the bytes written since its base version.
    changed: RangeSet,
    /// Ranges being fetched in the background (owned by `readahead`).
    fetching: Vec<InFlight>,
    /// One clone per upload reading the cache file itself: while any is out, a change first
    /// moves the file to a copy (`Filesystem::copy_aside`).
    upload_readers: Arc<()>,
    /// Open handles by route, and what the mount last saw of the kernel's direct writes (owned
    /// by `direct`).
    routes: Routes,
    /// What an fsync through the fsync log needs (see `fsync_log`).
    log: LogState,
}

/// A file's state for the fsync log: the stored version its changes build on, and what changed
/// since that is not in a record yet.
#[derive(Debug, Default)]
struct LogState {
    /// The version the store holds at a key, which the file's changes build on; None where
    /// that is not known (a new file not uploaded yet, one the kernel wrote directly, one
    /// whose upload an earlier mount logged). Good only while the file has that key.
    base: Option<LogBase>,
    /// Changed since `base` and in no record yet.
    unsent: Delta,
    /// Changed since the snapshot of the upload in flight: what `unsent` is once it lands.
    since_snapshot: Delta,
    /// The base became unknown while an upload was in flight.
    forgotten_since_snapshot: bool,
    /// One clone per upload of the file in flight.
    uploads: Arc<()>,
    /// The records written over `base`, deleted once an upload makes them moot.
    records: Vec<String>,
    /// Whether the last record taken landed, once known (see `durable`).
    last_record: Option<RecordOutcome>,
}

impl LogState {
    /// Records a change (a write, a truncation) where it can count: since the base, if that is
    /// known, and since the snapshot of an upload in flight. Elsewhere it is not needed (the
    /// next base starts afresh), and a write does no more work than it must.
    fn changed(&mut self, record: impl Fn(&mut Delta)) {
        if self.base.is_some() {
            record(&mut self.unsent);
        }
        if Arc::strong_count(&self.uploads) > 1 {
            record(&mut self.since_snapshot);
        }
    }
}

/// Whether a record landed: `None` until its put ends.
pub(super) type RecordOutcome = tokio::sync::watch::Receiver<Option<bool>>;

/// A stored version of a file: its key, ETag and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LogBase {
    pub(super) key: String,
    pub(super) etag: ETag,
    pub(super) size: u64,
}

/// What an fsync sends to the fsync log: the file's changes since `base`.
#[derive(Debug)]
pub(super) struct LogCapture {
    pub(super) base: LogBase,
    pub(super) delta: Delta,
}

impl FileContents {
    fn with(cache_name: String, file: File, present: RangeSet, dirty: bool) -> Self {
        Self {
            cache_name,
            file: Arc::new(file),
            present,
            etag: None,
            remote_limit: 0,
            dirty,
            generation: 0,
            queued_generation: 0,
            dirty_since: None,
            kernel_cached: None,
            changed: RangeSet::default(),
            fetching: Vec::new(),
            upload_readers: Arc::default(),
            routes: Routes::default(),
            log: LogState::default(),
        }
    }

    /// A file made here: an empty cache file, changed from the start.
    pub(super) fn created(cache_name: String, file: File) -> Self {
        Self::with(cache_name, file, RangeSet::default(), true)
    }

    /// A file whose upload waits in the change log: its cache file of `length` bytes is the
    /// file, or for a partial file, its own bytes over a base version in the store.
    pub(super) fn pending(
        cache_name: String,
        file: File,
        length: u64,
        partial: Option<Partial>,
    ) -> Self {
        match partial {
            Some(partial) => Self {
                present: partial.changed.clone(),
                changed: partial.changed,
                etag: Some(partial.etag),
                remote_limit: partial.base_end,
                ..Self::with(cache_name, file, RangeSet::default(), true)
            },
            None => Self::with(cache_name, file, RangeSet::full(length), true),
        }
    }

    /// A clean file of the store's version `etag` at `key`, of which the cache file holds
    /// `present`, and the store the bytes below `remote_limit`.
    pub(super) fn stored(
        key: &str,
        cache_name: String,
        file: File,
        present: RangeSet,
        etag: ETag,
        remote_limit: u64,
    ) -> Self {
        Self {
            log: LogState {
                base: Some(LogBase {
                    key: key.to_string(),
                    etag: etag.clone(),
                    size: remote_limit,
                }),
                ..LogState::default()
            },
            etag: Some(etag),
            remote_limit,
            ..Self::with(cache_name, file, present, false)
        }
    }

    // ----- what the state is -----

    pub(super) fn cache_name(&self) -> &str {
        &self.cache_name
    }

    pub(super) fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub(super) fn present(&self) -> &RangeSet {
        &self.present
    }

    pub(super) fn etag(&self) -> Option<&ETag> {
        self.etag.as_ref()
    }

    pub(super) fn remote_limit(&self) -> u64 {
        self.remote_limit
    }

    pub(super) fn dirty(&self) -> bool {
        self.dirty
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn dirty_since(&self) -> Option<Instant> {
        self.dirty_since
    }

    /// Whether the change log holds this file's latest change.
    pub(super) fn queued(&self) -> bool {
        self.queued_generation == self.generation
    }

    /// Whether an upload is reading the cache file itself right now.
    pub(super) fn read_by_upload(&self) -> bool {
        Arc::strong_count(&self.upload_readers) > 1
    }

    /// A token an upload holds while it reads the cache file itself.
    pub(super) fn upload_reader(&self) -> Arc<()> {
        Arc::clone(&self.upload_readers)
    }

    pub(super) fn fetching(&self) -> &[InFlight] {
        &self.fetching
    }

    pub(super) fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Whether the file is changed and holds only part of its bytes (see [`Self::partial`]),
    /// without copying what it holds.
    pub(super) fn is_partial(&self) -> bool {
        self.etag.is_some() && self.dirty && self.remote_limit > 0
    }

    /// A changed file that holds only part of its bytes: the rest, below `remote_limit`, are
    /// those of the store's version `etag`.
    pub(super) fn partial(&self) -> Option<Partial> {
        match &self.etag {
            Some(etag) if self.dirty && self.remote_limit > 0 => Some(Partial {
                etag: etag.clone(),
                base_end: self.remote_limit,
                changed: self.changed.clone(),
            }),
            _ => None,
        }
    }

    // ----- parts other modules own -----

    /// The handles' routes, which `direct` keeps.
    pub(super) fn routes_mut(&mut self) -> &mut Routes {
        &mut self.routes
    }

    /// The background fetches, which `readahead` keeps.
    pub(super) fn fetching_mut(&mut self) -> &mut Vec<InFlight> {
        &mut self.fetching
    }

    // ----- what happened -----

    /// The kernel opened the file: whether it may keep its page cache (it holds this version,
    /// and the open does not truncate).
    pub(super) fn opened_by_kernel(&mut self, truncates: bool) -> bool {
        let keep = !truncates && self.kernel_cached.is_some() && self.kernel_cached == self.etag;
        self.kernel_cached = self.etag.clone();
        keep
    }

    /// The kernel reads and writes the cache file itself: its page cache is its own business.
    pub(super) fn kernel_took_over(&mut self) {
        self.kernel_cached = None;
    }

    /// Bytes fetched from the store landed in the cache file.
    pub(super) fn fetched(&mut self, range: Range<u64>) {
        self.present.insert(range);
    }

    /// The store holds a new version of the file at `key` (another host wrote it, or this one
    /// before a crash): the cached bytes no longer count.
    pub(super) fn take_store_version(&mut self, key: &str, etag: ETag, size: u64) {
        self.log.base = Some(LogBase {
            key: key.to_string(),
            etag: etag.clone(),
            size,
        });
        self.log.unsent = Delta::default();
        self.present = RangeSet::default();
        self.etag = Some(etag);
        self.remote_limit = size;
    }

    /// Every byte below `size` is in the cache file: nothing more comes from the store.
    pub(super) fn made_whole(&mut self, size: u64) {
        self.remote_limit = 0;
        self.present = RangeSet::full(size);
    }

    /// Unlinked while open: nothing more comes from the store.
    pub(super) fn cut_from_store(&mut self) {
        self.remote_limit = 0;
        self.forget_log_base();
    }

    /// Bytes at or past `size` will not come from the store (a truncation).
    pub(super) fn limit_store_bytes(&mut self, size: u64) {
        self.remote_limit = self.remote_limit.min(size);
    }

    /// A clean file starts to change, keeping what it lacks below `size` in the store.
    pub(super) fn start_partial_change(&mut self, size: u64) {
        self.remote_limit = self.remote_limit.min(size);
        self.dirty = true;
        self.changed = RangeSet::default();
    }

    /// A clean file whose cache file holds all of its `size` bytes starts to change.
    pub(super) fn start_whole_change(&mut self, size: u64) {
        self.dirty = true;
        self.made_whole(size);
    }

    /// One more change (a write, a truncation) of a dirty file.
    pub(super) fn count_change(&mut self) {
        self.generation += 1;
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    /// The kernel wrote the cache file itself, now `size` bytes long.
    pub(super) fn written_by_kernel(&mut self, size: u64) {
        self.forget_log_base();
        self.dirty = true;
        self.count_change();
        self.present = RangeSet::full(size);
    }

    /// The cache file moved to a copy of its own (`file`), away from an upload reading it.
    pub(super) fn moved_to(&mut self, file: File) {
        self.file = Arc::new(file);
        self.upload_readers = Arc::default();
    }

    /// `range` was written; the file is `size` bytes long now.
    pub(super) fn wrote(&mut self, range: Range<u64>, size: u64) {
        self.log.changed(|delta| delta.wrote(range.clone()));
        if self.is_partial() {
            self.present.insert(range.clone());
            self.changed.insert(range);
        } else {
            self.present.insert(0..size);
        }
    }

    /// Whether a partial file's own bytes already cover `range`.
    pub(super) fn changed_covers(&self, range: Range<u64>) -> bool {
        self.changed.contains(range)
    }

    /// Cut to `size` bytes.
    pub(super) fn truncated(&mut self, size: u64) {
        self.log.changed(|delta| delta.truncated(size));
        if self.is_partial() {
            self.present.truncate(size);
            self.changed.truncate(size);
        } else {
            // Cut to nothing of its base version: no longer partial, if it was.
            self.present = RangeSet::full(size);
        }
    }

    /// Its latest change is in the change log.
    pub(super) fn queued_for_upload(&mut self) {
        self.queued_generation = self.generation;
        self.dirty_since = None;
    }

    /// The upload of `generation` landed as the store's version `etag` of `size` bytes, and
    /// nothing changed since: the file is clean. Returns what the cache file holds of it.
    pub(super) fn uploaded(&mut self, etag: ETag, size: u64, was_partial: bool) -> RangeSet {
        self.dirty = false;
        self.remote_limit = size;
        if !was_partial {
            self.present = RangeSet::full(size);
        }
        self.kernel_cached = Some(etag.clone());
        self.etag = Some(etag);
        self.dirty_since = None;
        self.present.clone()
    }

    /// A partial file changed again during its upload: what it lacks is now the uploaded
    /// version's (copied there unchanged), so that becomes its base. Returns the new base.
    pub(super) fn rebase(&mut self, etag: ETag, base_end: u64) -> Option<Partial> {
        self.etag = Some(etag);
        self.remote_limit = base_end;
        self.partial()
    }

    /// A rename's copy in the store made `etag` the version of the clean bytes cached as `old`.
    /// Returns what is cached, if the file was that clean version.
    pub(super) fn copied_as(&mut self, old: &ETag, etag: ETag) -> Option<RangeSet> {
        if self.dirty || self.etag.as_ref() != Some(old) {
            return None;
        }
        self.etag = Some(etag);
        Some(self.present.clone())
    }

    // ----- the fsync log -----

    /// The file's bytes changed in a way the log cannot say (an unlink, writes the kernel made
    /// itself), or a record of it failed: its fsyncs upload it whole until its next upload
    /// lands.
    pub(super) fn forget_log_base(&mut self) {
        self.log.base = None;
        self.log.unsent = Delta::default();
        self.log.forgotten_since_snapshot = true;
    }

    /// For an fsync through the log of the file at `key`, whose version in the store is
    /// `stored` as far as the mount knows: the changes since the base, taken out of `unsent`.
    /// None if the file cannot go that way now: its base is not known, is under another name
    /// or is not what the store holds (a change of the key landed since), an upload of it is
    /// in flight (its new base is not known yet), or more than `limit` bytes changed.
    pub(super) fn take_for_log(
        &mut self,
        key: &str,
        stored: Option<&ETag>,
        limit: u64,
    ) -> Option<LogCapture> {
        let base = self
            .log
            .base
            .clone()
            .filter(|base| base.key == key && Some(&base.etag) == stored)?;
        if Arc::strong_count(&self.log.uploads) > 1 || self.log.unsent.written.len() > limit {
            return None;
        }
        let delta = std::mem::take(&mut self.log.unsent);
        Some(LogCapture { base, delta })
    }

    /// The record `key` holds a capture over the file's base.
    pub(super) fn logged(&mut self, key: String) {
        self.log.records.push(key);
    }

    /// The next record's outcome will be `next`; returns the one before it, if any.
    pub(super) fn follow_last_record(&mut self, next: RecordOutcome) -> Option<RecordOutcome> {
        self.log.last_record.replace(next)
    }

    /// An upload of the file took its snapshot now: a token it holds until it ends.
    pub(super) fn upload_started(&mut self) -> Arc<()> {
        self.log.since_snapshot = Delta::default();
        self.log.forgotten_since_snapshot = false;
        Arc::clone(&self.log.uploads)
    }

    /// The upload of the snapshot landed at `key` as the store's version `etag` of `size`
    /// bytes, which is the file's new base (unless the file changed in a way the log cannot
    /// say, or `known` is false); `changed_since`: the file changed after the snapshot.
    /// Returns the records the upload made moot.
    pub(super) fn upload_landed(
        &mut self,
        key: &str,
        etag: ETag,
        size: u64,
        changed_since: bool,
        known: bool,
    ) -> Vec<String> {
        let since = std::mem::take(&mut self.log.since_snapshot);
        if known && !self.log.forgotten_since_snapshot {
            self.log.base = Some(LogBase {
                key: key.to_string(),
                etag,
                size,
            });
            self.log.unsent = if changed_since {
                since
            } else {
                Delta::default()
            };
        } else {
            self.forget_log_base();
        }
        std::mem::take(&mut self.log.records)
    }
}
