//! The filesystem logic: POSIX operations over a store prefix, local first. Async, FUSE-free,
//! and returning plain results, so that it is tested directly (the property test drives it
//! against a model) and the FUSE adapter stays thin.
//!
//! Mapping (docs/SEMANTICS.md has the full contract): a file or symlink is one object whose key
//! is its path; a directory is a key prefix plus a `dir/` marker object; attributes travel as
//! s3fs-style metadata. Reads fill a local block cache from the store. Changes apply to the
//! local cache and to the change log ([`crate::journal`]) and return at local speed; the
//! uploader ([`upload`]) applies the log to the store in order, in the background.
//!
//! This file holds the [`Filesystem`] itself: its parts, how they are wired, and the order of
//! their locks. The operations live beside it, one concern a file, each an `impl Filesystem`
//! over the parts (docs/ARCHITECTURE.md draws the picture):
//!
//! - state with rules of its own, in types that own it: [`contents`] (a file's cache file and
//!   what it holds; the only place its state changes), [`handles`] (open handles and read-ahead
//!   windows), [`health`] (whether the store answers), `upload::UploadState` (the uploader's
//!   status, attempts and fence), `upkeep::CacheUpkeep` (changed bytes, the last count of the
//!   cache), [`listings`] (pages of directories listed from above); and below this module,
//!   [`crate::namespace`] (the inode table) and [`crate::journal`] (the change log);
//! - the operations: [`lookup`] (a name to an inode: what the mount knows, the change log, the
//!   store), [`metadata`] (getattr, setattr, readlink), [`entries`] (create, mkdir, symlink,
//!   unlink, rmdir), [`dirs`] (listings merged with pending changes, readdir), [`rename`],
//!   [`open`] (open, flush, fsync, release), [`durable`] (fsync through the fsync log, and
//!   folding it at mount), [`open_files`] (loading and dropping a file's open state), [`read`] (and [`readahead`] in the background), [`write`] (writes, truncation,
//!   queueing an upload), [`direct`] (the kernel reading and writing cache files itself);
//! - the background: [`upload`] (applying the change log) and [`upkeep`] (eviction, room).

mod config;
mod contents;
mod direct;
mod dirs;
mod durable;
mod entries;
mod handles;
mod health;
mod listings;
mod lookup;
mod metadata;
mod names;
mod open;
mod open_files;
mod read;
mod readahead;
mod rename;
mod reply;
mod upkeep;
mod upload;
mod write;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use tokio::sync::Notify;

use crate::attrs::{Attrs, S_IFDIR};
use crate::cache::Cache;
use crate::error::{FsError, FsResult};
use crate::journal::{Change, Journal};
use crate::metrics::Metrics;
use crate::store::SharedStore;
use crate::store::metered::MeteredStore;
pub use config::FsConfig;
pub use contents::FileData;
use contents::*;
use handles::*;
use health::StoreHealth;
pub use names::NAME_MAX;
pub use reply::{Attr, DirEntry, Opened, SetAttrs, Statfs};

pub use upload::{Pending, Status};

/// The inode table, holding the open state of files.
pub(crate) type Namespace = crate::namespace::Namespace<FileData>;
/// An inode of the table.
pub(crate) type Inode = crate::namespace::Inode<FileData>;
use upkeep::CacheUpkeep;
use upload::UploadState;

/// The filesystem over one store prefix.
///
/// Lock order: a task takes these locks in this order and never the other way round:
/// 1. `files`, the registry of open files (async);
/// 2. one file's content lock, `FileData::content` (async; never two files' at once);
/// 3. `naming` (async, read or write);
/// 4. `ns`, the inode table (std; never held across an await);
/// 5. `journal`, the change log's memory (std; never held across an await; SQLite work runs
///    under it on a blocking thread, see `Filesystem::update_change_log`).
///
/// The other locks are leaves, each inside its part (`handles`, `health`, `uploads`, `upkeep`,
/// `listings`): nothing else is taken while one is held.
#[derive(Debug)]
pub struct Filesystem {
    /// The store, counted in `metrics`.
    store: SharedStore,
    metrics: Arc<Metrics>,
    cache: Cache,
    config: FsConfig,
    ns: Mutex<Namespace>,
    handles: Handles,
    journal: Arc<Mutex<Journal>>,
    /// Orders recording a change under a name read from the tree (shared: a close, a chmod)
    /// against removing or moving that name (exclusive: unlink, rename). A file's RELEASE
    /// reaches the mount after close() has returned, so it can race the caller's next unlink:
    /// without this, it could record the contents under the name just removed, and the file
    /// would come back in the store. Taken after a file's content lock, never before.
    naming: tokio::sync::RwLock<()>,
    /// Open or changed files by cache file name; the uploader snapshots through these.
    files: tokio::sync::Mutex<HashMap<String, Weak<FileData>>>,
    /// The uploader's state (see `upload`).
    uploads: UploadState,
    /// A change was applied (or failed): waiters look again.
    progress: Notify,
    /// New work for the uploader.
    wake: Notify,
    /// Changed bytes and the last count of the cache (see `upkeep`).
    upkeep: CacheUpkeep,
    /// Set when the store did not answer in time: until then, lookups and listings answer from what
    /// the mount knows without asking it again (so a store that stops answering does not make
    /// every new name wait out its timeouts).
    health: StoreHealth,
    /// Pages of directories listed along with a directory above them (see `listings`).
    listings: Mutex<listings::Listings>,
    /// The kernel agreed to read and write cache files itself (see `direct`).
    passthrough: AtomicBool,
    /// The volume's fsync log, for its one writer (see `durable`).
    fsync_log: Option<Arc<crate::fsync_log::FsyncLog>>,
}

/// Runs blocking file or SQLite work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FsError::Io(std::io::Error::other(format!("blocking task failed: {e}"))))?
}

impl Filesystem {
    /// A filesystem over `store`, with its cache and change log in `cache`. Changes recorded by
    /// an earlier run (a crash) are picked up; [`Filesystem::start_uploader`] applies them.
    pub fn new(store: SharedStore, cache: Cache, config: FsConfig) -> FsResult<Self> {
        let journal = Journal::open(&cache.dir().join("journal.db"))?;
        let root_attrs = Attrs {
            mode: S_IFDIR | config.defaults.dir_mode,
            uid: config.defaults.uid,
            gid: config.defaults.gid,
            mtime: SystemTime::now(),
            atime: None,
            rdev: 0,
        };
        let metrics = Arc::new(Metrics::default());
        let store: SharedStore = Arc::new(MeteredStore::new(store, Arc::clone(&metrics)));
        let fs = Self {
            store,
            metrics,
            cache,
            config,
            ns: Mutex::new(Namespace::new(root_attrs)),
            handles: Handles::default(),
            journal: Arc::new(Mutex::new(journal)),
            naming: tokio::sync::RwLock::new(()),
            listings: Mutex::default(),
            files: tokio::sync::Mutex::new(HashMap::new()),
            uploads: UploadState::default(),
            progress: Notify::new(),
            wake: Notify::new(),
            upkeep: CacheUpkeep::default(),
            health: StoreHealth::default(),
            passthrough: AtomicBool::new(false),
            fsync_log: None,
        };
        fs.remove_orphaned_cache_files()?;
        Ok(fs)
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// What this mount counted so far.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn ns(&self) -> MutexGuard<'_, Namespace> {
        self.ns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The change log's in-memory side (no disk I/O while held).
    fn change_log(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a change-log update (which writes SQLite) off the async workers.
    async fn update_change_log<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Journal) -> FsResult<T> + Send + 'static,
    ) -> FsResult<T> {
        let journal = Arc::clone(&self.journal);
        let result =
            blocking(move || work(&mut journal.lock().unwrap_or_else(|p| p.into_inner()))).await;
        self.wake.notify_one();
        result
    }

    /// Records a change of `key`, due after the write-back delay (or now).
    async fn log_change(
        &self,
        key: &str,
        change: Change,
        store_has: bool,
        delayed: bool,
    ) -> FsResult<Option<u64>> {
        let due = if delayed {
            SystemTime::now() + self.config.writeback_delay
        } else {
            SystemTime::now()
        };
        let key = key.to_string();
        self.listings().changed(&key);
        let recorded = {
            let key = key.clone();
            self.update_change_log(move |j| j.record(&key, change, store_has, due))
                .await
        };
        self.listings().changed(&key);
        recorded
    }

    fn listings(&self) -> MutexGuard<'_, listings::Listings> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> FsResult<()> {
        if self.config.read_only || self.fenced().is_some() {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// A mount of `store` on a fresh cache directory, for unit tests (the uploader not started).
#[cfg(test)]
pub(crate) fn test_mount(
    store: SharedStore,
    config: FsConfig,
) -> (Arc<Filesystem>, tempfile::TempDir) {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(cache_dir.path()).unwrap();
    let fs = Filesystem::new(store, cache, config).unwrap();
    (Arc::new(fs), cache_dir)
}

/// An in-memory store holding `objects` (key, body), for unit tests.
#[cfg(test)]
pub(crate) async fn store_holding(
    objects: &[(&str, &[u8])],
) -> Arc<crate::store::memory::MemoryStore> {
    use crate::store::{PutOptions, Store};
    let store = Arc::new(crate::store::memory::MemoryStore::new());
    for (key, body) in objects {
        let body = bytes::Bytes::copy_from_slice(body);
        store.put(key, body, PutOptions::default()).await.unwrap();
    }
    store
}
