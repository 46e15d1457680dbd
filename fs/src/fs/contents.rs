//! A file's contents while it is open or changed: its cache file and what that holds.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Instant;

use super::direct;
use super::readahead;
use crate::cache::{Partial, RangeSet};

/// The contents of one file while it is open or changed: a cache file and what it holds.
#[derive(Debug)]
pub struct FileData {
    pub(super) ino: u64,
    pub(super) content: tokio::sync::Mutex<Content>,
    pub(super) size: AtomicU64,
    pub(super) opens: AtomicUsize,
    /// Handles through which the kernel writes the cache file itself (changed under the
    /// content lock; read without it to know whether attributes must be looked up there).
    pub(super) direct_writers: AtomicUsize,
}

#[derive(Debug)]
pub(super) struct Content {
    pub(super) cache_name: String,
    pub(super) file: Arc<File>,
    /// Valid bytes of the cache file (when dirty, all of `0..size`).
    pub(super) present: RangeSet,
    /// The store version the clean bytes are from.
    pub(super) etag: Option<crate::store::ETag>,
    /// Bytes at or past this offset never come from the store (truncated, or written past).
    pub(super) remote_limit: u64,
    /// Differs from the store (changed here and not yet uploaded).
    pub(super) dirty: bool,
    /// Counts changes; the upload of a snapshot cleans the file only if none came after it.
    pub(super) generation: u64,
    /// The generation last recorded in the change log.
    pub(super) queued_generation: u64,
    /// When the file first changed since its last upload was queued.
    pub(super) dirty_since: Option<Instant>,
    /// The version the kernel's page cache holds, from the last open.
    pub(super) kernel_cached: Option<crate::store::ETag>,
    /// Of a partial file (see [`Content::partial`]): the bytes written since its base version.
    pub(super) changed: RangeSet,
    /// Ranges being fetched in the background (read-ahead).
    pub(super) fetching: Vec<readahead::InFlight>,
    /// One clone per upload reading the cache file itself: while any is out, a change first
    /// moves the file to a copy ([`Filesystem::copy_aside`]).
    pub(super) upload_readers: Arc<()>,
    /// Open handles by route, and what the mount last saw of the kernel's direct writes.
    pub(super) routes: direct::Routes,
}

impl Content {
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
}
