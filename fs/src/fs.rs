//! The filesystem logic: POSIX operations over a store prefix, local first. Async, FUSE-free,
//! and returning plain results, so that it is tested directly (the property test drives it
//! against a model) and the FUSE adapter stays thin.
//!
//! Mapping (docs/SEMANTICS.md has the full contract): a file or symlink is one object whose key
//! is its path; a directory is a key prefix plus a `dir/` marker object; attributes travel as
//! s3fs-style metadata. Reads fill a local block cache from the store. Changes apply to the
//! local cache and to the change log ([`crate::journal`]) and return at local speed; the
//! uploader ([`upload`]) applies the log to the store in order, in the background.

mod direct;
mod listings;
mod readahead;
mod upload;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::Notify;

use crate::attrs::{Attrs, Defaults, Kind, S_IFDIR, S_IFREG};
use crate::cache::{self, Cache, Partial, RangeSet};
use crate::error::{FsError, FsResult};
use crate::journal::{Change, Journal, StoredAttrs};
use crate::metrics::Metrics;
use crate::namespace::{Inode, Namespace, ROOT, Remote};
use crate::store::metered::MeteredStore;
use crate::store::{
    ErrorKind, GetOptions, ListOptions, ListPage, MAX_KEY_LEN, ObjectInfo, PutOptions, SharedStore,
    StoreExt,
};
use direct::{Look, Open, Route};

pub use upload::{Pending, Status};

/// The longest file name, in bytes.
pub const NAME_MAX: usize = 255;

/// How the filesystem behaves.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Attributes shown for objects that carry none.
    pub defaults: Defaults,
    /// How long what the store said is trusted before asking again (and the kernel's TTL).
    pub metadata_ttl: Duration,
    pub read_only: bool,
    /// Reads fetch whole blocks of this size.
    pub block_size: u64,
    /// The read-ahead window grows on sequential reads up to this.
    pub max_readahead: u64,
    /// Files up to this size upload in one put; larger ones in multipart parts of `part_size`.
    pub single_put_limit: u64,
    pub part_size: u64,
    /// Store requests in flight for one read or upload.
    pub concurrency: usize,
    /// Changes applied to the store at once.
    pub uploads_in_flight: usize,
    /// How long after a close a file's upload waits (more writes may follow).
    pub writeback_delay: Duration,
    /// fsync returns once the data is on local disk (true) or in the store (false).
    pub fsync_local: bool,
    /// A file kept open and written is uploaded at least this often.
    pub max_dirty_age: Duration,
    /// Bytes of local disk the cache may use; clean data beyond it is evicted, and writers wait
    /// for uploads when changed data fills it.
    pub cache_size: u64,
    /// A stored file at least this large that changes before it is all cached keeps its
    /// unchanged bytes in the store: its upload copies those parts inside the store instead of
    /// downloading and uploading them again.
    pub copy_threshold: u64,
    /// Let the kernel read and write a file's cache file itself (FUSE passthrough) when the cache
    /// file holds the whole file, if the kernel offers it (see `direct`).
    pub passthrough: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            defaults: Defaults::default(),
            metadata_ttl: Duration::from_secs(2),
            read_only: false,
            block_size: 1 << 20,
            max_readahead: 128 << 20,
            single_put_limit: 16 << 20,
            part_size: 8 << 20,
            concurrency: 8,
            uploads_in_flight: 8,
            writeback_delay: Duration::from_secs(2),
            fsync_local: false,
            max_dirty_age: Duration::from_secs(30),
            cache_size: 10 << 30,
            copy_threshold: 32 << 20,
            passthrough: true,
        }
    }
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub attr: Attr,
}

/// The changes of a `setattr` call.
#[derive(Debug, Clone, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
}

/// An opened file.
#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep its page cache of the file: it has not changed since last opened.
    pub keep_cache: bool,
    /// The kernel should read and write this cache file itself (see `direct`).
    pub direct: Option<Arc<File>>,
}

/// The contents of one file while it is open or changed: a cache file and what it holds.
#[derive(Debug)]
pub struct FileData {
    ino: u64,
    content: tokio::sync::Mutex<Content>,
    size: AtomicU64,
    opens: AtomicUsize,
    /// Handles through which the kernel writes the cache file itself (changed under the
    /// content lock; read without it to know whether attributes must be looked up there).
    direct_writers: AtomicUsize,
}

#[derive(Debug)]
struct Content {
    cache_name: String,
    file: Arc<File>,
    /// Valid bytes of the cache file (when dirty, all of `0..size`).
    present: RangeSet,
    /// The store version the clean bytes are from.
    etag: Option<crate::store::ETag>,
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
    kernel_cached: Option<crate::store::ETag>,
    /// Of a partial file (see [`Content::partial`]): the bytes written since its base version.
    changed: RangeSet,
    /// Ranges being fetched in the background (read-ahead).
    fetching: Vec<readahead::InFlight>,
    /// One clone per upload reading the cache file itself: while any is out, a change first
    /// moves the file to a copy ([`Filesystem::copy_aside`]).
    upload_readers: Arc<()>,
    /// Open handles by route, and what the mount last saw of the kernel's direct writes.
    routes: direct::Routes,
}

impl Content {
    /// A changed file that holds only part of its bytes: the rest, below `remote_limit`, are
    /// those of the store's version `etag`.
    fn partial(&self) -> Option<Partial> {
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

#[derive(Debug)]
enum Handle {
    File {
        ino: u64,
        /// Where the next sequential read would start, and the current read-ahead window.
        next_offset: u64,
        window: u64,
        /// How the kernel reaches the file's bytes through this handle.
        route: direct::Route,
    },
    /// An open directory: listed at its first `readdir` (so an open for `fsync`, as SQLite
    /// does at each commit, costs no listing).
    Dir {
        ino: u64,
        entries: Option<Arc<Vec<DirEntry>>>,
    },
}

/// What a probe of the store found at a name.
#[derive(Debug)]
enum Found {
    Object(ObjectInfo),
    Dir(Option<ObjectInfo>),
}

/// The filesystem over one store prefix.
#[derive(Debug)]
pub struct Filesystem {
    /// The store, counted in `metrics`.
    store: SharedStore,
    metrics: Arc<Metrics>,
    cache: Cache,
    config: FsConfig,
    ns: Mutex<Namespace>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    journal: Arc<Mutex<Journal>>,
    /// Orders recording a change under a name read from the tree (shared: a close, a chmod)
    /// against removing or moving that name (exclusive: unlink, rename). A file's RELEASE
    /// reaches the mount after close() has returned, so it can race the caller's next unlink:
    /// without this, it could record the contents under the name just removed, and the file
    /// would come back in the store. Taken after a file's content lock, never before.
    naming: tokio::sync::RwLock<()>,
    /// Open or changed files by cache file name; the uploader snapshots through these.
    files: tokio::sync::Mutex<HashMap<String, Weak<FileData>>>,
    /// A change was applied (or failed): waiters look again.
    progress: Notify,
    /// New work for the uploader.
    wake: Notify,
    status: Mutex<Status>,
    /// Failed attempts per pending change, for backoff.
    attempts: Mutex<HashMap<u64, u32>>,
    /// Bytes of changed data not yet in the store (refreshed by the uploader).
    dirty_bytes: AtomicU64,
    /// The cache disk's free bytes at the uploader's last count of the cache, and when: while
    /// they stay the same, nothing was written to or removed from the cache, so it is not
    /// counted again (one `stat` per cache file, every second, on an idle mount).
    last_cache_count: Mutex<Option<(u64, Instant)>>,
    /// Set when this mount may no longer write to the store (its lease was taken over): why.
    fenced: Mutex<Option<String>>,
    /// With a lease: until when the last renewal lets this mount write to the store.
    uploads_until: Mutex<Option<Instant>>,
    /// Set when the store did not answer in time: until then, lookups and listings answer from what
    /// the mount knows without asking it again (so a store that stops answering does not make
    /// every new name wait out its timeouts).
    store_down_until: Arc<Mutex<Option<Instant>>>,
    /// Pages of directories listed along with a directory above them (see `listings`).
    listings: Mutex<listings::Listings>,
    /// The kernel agreed to read and write cache files itself (see `direct`).
    passthrough: AtomicBool,
}

/// How long after the store failed to answer lookups and listings stop asking it; then one
/// request in the background looks again (and the uploader's first success ends it early).
const STORE_DOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a lookup or listing waits for the store before answering from what the mount knows.
const METADATA_BUDGET: Duration = Duration::from_secs(10);
/// The most names a directory's last listing may have held for a miss there to list it again.
const RELIST_LIMIT: usize = 10_000;

/// How long a write on a full cache disk waits for uploads to free room before ENOSPC.
const ROOM_WAIT: Duration = Duration::from_secs(30);

fn check_name(name: &OsStr) -> FsResult<String> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong(format!("{} bytes", name.len())));
    }
    let text = std::str::from_utf8(name.as_bytes())
        .map_err(|_| FsError::Invalid("file names must be valid UTF-8".into()))?;
    if text.is_empty() || text == "." || text == ".." || text.contains('/') || text.contains('\0') {
        return Err(FsError::Invalid(format!("{text:?} is not a file name")));
    }
    Ok(text.to_string())
}

/// A name for something new: also no control characters, which S3 listings cannot carry
/// reliably (and some S3 servers refuse in keys).
fn check_new_name(name: &OsStr) -> FsResult<String> {
    let text = check_name(name)?;
    if text.chars().any(|c| c.is_ascii_control()) {
        return Err(FsError::Invalid(format!(
            "{text:?}: names with control characters (newline, tab...) are not stored"
        )));
    }
    Ok(text)
}

/// Runs blocking file or SQLite work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FsError::Io(std::io::Error::other(format!("blocking task failed: {e}"))))?
}

/// The largest read served on an async worker when the page cache holds it (a copy, no I/O).
const IN_MEMORY_READ_LIMIT: u64 = 128 << 10;

/// `range` of a cache file if the page cache holds all of it, read without waiting on the disk
/// (`RWF_NOWAIT`): a read of data in memory then needs no hop to a blocking thread. None when
/// some of it would need the disk (or the range is large): read it with [`read_at`] off the
/// async workers.
fn read_if_in_memory(file: &File, range: Range<u64>) -> Option<Vec<u8>> {
    let len = range.end - range.start;
    if len > IN_MEMORY_READ_LIMIT {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points into `buf`, which outlives the call, and the descriptor is open
    // for as long as `file` is.
    let read = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            range.start as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    (usize::try_from(read).ok() == Some(buf.len())).then_some(buf)
}

fn read_at(file: &File, range: Range<u64>) -> FsResult<Vec<u8>> {
    let mut buf = vec![0; (range.end - range.start) as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], range.start + done as u64)?;
        if n == 0 {
            break; // Past the end of a sparse cache file: zeros, as the buffer already holds.
        }
        done += n;
    }
    Ok(buf)
}

/// Whether an error means the store cannot be reached right now (so local answers may do).
fn unreachable(err: &FsError) -> bool {
    matches!(err, FsError::Store(e) if e.kind().is_retryable())
}

/// Whether an error means the store did not answer in time (an error it answered with, a 500
/// say, shows it is there).
fn timed_out(err: &FsError) -> bool {
    matches!(err, FsError::Store(e) if e.kind() == ErrorKind::Timeout)
}

/// What a lookup or listing gets when the store does not answer in time, or did not a moment
/// ago.
fn store_down() -> crate::store::StoreError {
    crate::store::StoreError::new(
        ErrorKind::Timeout,
        "the store does not answer; answering from what this mount knows",
    )
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
        };
        let metrics = Arc::new(Metrics::default());
        let store: SharedStore = Arc::new(MeteredStore::new(store, Arc::clone(&metrics)));
        let fs = Self {
            store,
            metrics,
            cache,
            config,
            ns: Mutex::new(Namespace::new(root_attrs)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            journal: Arc::new(Mutex::new(journal)),
            naming: tokio::sync::RwLock::new(()),
            listings: Mutex::default(),
            files: tokio::sync::Mutex::new(HashMap::new()),
            progress: Notify::new(),
            wake: Notify::new(),
            status: Mutex::new(Status::default()),
            attempts: Mutex::new(HashMap::new()),
            dirty_bytes: AtomicU64::new(0),
            last_cache_count: Mutex::new(None),
            fenced: Mutex::new(None),
            uploads_until: Mutex::new(None),
            store_down_until: Arc::default(),
            passthrough: AtomicBool::new(false),
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

    /// Whether the store failed to answer lately. Once [`STORE_DOWN_GRACE`] has passed, a
    /// request in the background looks again, and until it succeeds the answer stays yes: no
    /// lookup or listing waits on a store that is known not to answer.
    fn store_seems_down(&self) -> bool {
        let mut until = self
            .store_down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *until {
            None => false,
            Some(at) if Instant::now() < at => true,
            Some(_) => {
                *until = Some(Instant::now() + STORE_DOWN_GRACE);
                let (store, down) = (Arc::clone(&self.store), Arc::clone(&self.store_down_until));
                tokio::spawn(async move {
                    // Any answer, "no such key" included, means the store is back.
                    if store.head_opt(".cairn/alive").await.is_ok() {
                        *down.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                });
                true
            }
        }
    }

    /// Notes whether a metadata request reached the store.
    fn note_store_reached(&self, reached: bool) {
        if reached {
            self.store_answered();
        } else {
            let mut until = self
                .store_down_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *until = Some(Instant::now() + STORE_DOWN_GRACE);
        }
    }

    /// The store answered: ask it again from now on.
    fn store_answered(&self) {
        *self
            .store_down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The change log's in-memory side (no disk I/O while held).
    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a change-log update (which writes SQLite) off the async workers.
    async fn log<T: Send + 'static>(
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
    async fn record(
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
            self.log(move |j| j.record(&key, change, store_has, due))
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

    fn attr_of(inode: &Inode) -> Attr {
        let size = match &inode.file {
            Some(data) => data.size.load(Ordering::Acquire),
            None => inode.size,
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind(),
            size,
            perm: inode.attrs.perm(),
            uid: inode.attrs.uid,
            gid: inode.attrs.gid,
            mtime: inode.attrs.mtime,
            ctime: inode.ctime,
        }
    }

    /// Whether what the mount knows of an inode may be used without asking the store.
    fn trusted(&self, inode: &Inode) -> bool {
        inode.ino == ROOT
            || inode.file.is_some()
            || inode.checked.elapsed() < self.config.metadata_ttl
    }

    fn attr(&self, ino: u64) -> FsResult<Attr> {
        self.ns()
            .get(ino)
            .map(Self::attr_of)
            .ok_or(FsError::NotFound)
    }

    /// The key of `name` in directory `parent`.
    fn child_key(ns: &Namespace, parent: u64, name: &str) -> FsResult<String> {
        let parent_inode = ns.get(parent).ok_or(FsError::NotFound)?;
        if parent_inode.kind() != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let prefix = ns.dir_prefix(parent).ok_or(FsError::NotFound)?;
        let key = format!("{prefix}{name}");
        // Room for the `/` of a directory marker too.
        if key.len() + 1 > MAX_KEY_LEN {
            return Err(FsError::NameTooLong(format!(
                "the path is over {MAX_KEY_LEN} bytes"
            )));
        }
        Ok(key)
    }

    fn key_of(&self, ino: u64) -> FsResult<String> {
        self.ns().key(ino).ok_or(FsError::NotFound)
    }

    /// Asks the store what is at `key`: an object, a directory (prefix, with or without a
    /// marker), or nothing.
    async fn probe(&self, key: &str, listed_as: Option<Kind>) -> FsResult<Option<Found>> {
        let marker = format!("{key}/");
        // A listing just showed what the name is: one request for its attributes will do.
        match listed_as {
            Some(Kind::Dir) => return Ok(Some(Found::Dir(self.store.head_opt(&marker).await?))),
            Some(_) => return Ok(self.store.head_opt(key).await?.map(Found::Object)),
            None => {}
        }
        let one = ListOptions {
            delimited: false,
            continuation: None,
            max_keys: Some(1),
        };
        let (object, marker_info, listed) = tokio::join!(
            self.store.head_opt(key),
            self.store.head_opt(&marker),
            self.store.list(&marker, one),
        );
        let listed = listed?;
        let marker_info = marker_info?;
        if marker_info.is_some() || !listed.objects.is_empty() || !listed.prefixes.is_empty() {
            return Ok(Some(Found::Dir(marker_info)));
        }
        Ok(object?.map(Found::Object))
    }

    /// Records what a probe found under `parent`/`name` and returns the inode number.
    fn install(&self, ns: &mut Namespace, parent: u64, name: &str, found: Found) -> u64 {
        if let Some(ino) = ns.child(parent, name) {
            let inode = ns.get_mut(ino).expect("a child is a live inode");
            if inode.file.is_some() {
                // Open or changed here: the local state wins.
                inode.checked = Instant::now();
                return ino;
            }
        }
        let defaults = &self.config.defaults;
        match found {
            Found::Object(info) => {
                let attrs = Attrs::decode(&info.metadata, Kind::File, info.last_modified, defaults);
                let remote = Remote {
                    etag: info.etag,
                    size: info.size,
                };
                let ino = ns.upsert(parent, name, attrs, info.size, Some(remote.clone()));
                if let Some(inode) = ns.get_mut(ino)
                    && inode.remote.as_ref() != Some(&remote)
                {
                    inode.target = None;
                }
                ino
            }
            Found::Dir(marker) => {
                let (attrs, remote) = match marker {
                    Some(info) => (
                        Attrs::decode(&info.metadata, Kind::Dir, info.last_modified, defaults),
                        Some(Remote {
                            etag: info.etag,
                            size: 0,
                        }),
                    ),
                    None => (
                        Attrs::decode(&Default::default(), Kind::Dir, SystemTime::now(), defaults),
                        None,
                    ),
                };
                ns.upsert(parent, name, attrs, 0, remote)
            }
        }
    }

    /// The size a pending change gives its key.
    async fn pending_size(&self, change: &Change) -> u64 {
        match change {
            Change::PutFile { cache_file, .. } => {
                let path = self.cache.path_of(cache_file);
                blocking(move || Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)))
                    .await
                    .unwrap_or(0)
            }
            Change::Copy { size, .. } => *size,
            Change::PutSymlink { target, .. } => target.len() as u64,
            _ => 0,
        }
    }

    /// Finds `name` in `parent`: from what the mount knows while it is fresh, else from the
    /// change log, else from the store. With the store unreachable, what the mount knows
    /// (even stale) answers.
    async fn resolve(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        self.resolve_listed(parent, name, None).await
    }

    /// [`Self::resolve`] of a name a listing just showed as `listed_as` (a file or a directory),
    /// which spares the store the requests that tell one from the other.
    async fn resolve_listed(
        &self,
        parent: u64,
        name: &str,
        listed_as: Option<Kind>,
    ) -> FsResult<Option<u64>> {
        let mut listed_as = listed_as;
        let (key, known_object) = {
            let ns = self.ns();
            let key = Self::child_key(&ns, parent, name)?;
            let mut known_object = None;
            if let Some(ino) = ns.child(parent, name) {
                let inode = ns.get(ino).expect("live child");
                if self.trusted(inode) {
                    tracing::debug!(
                        "{key}: known (inode {ino}, open or changed here: {}, checked {:?} ago)",
                        inode.file.is_some(),
                        inode.checked.elapsed()
                    );
                    return Ok(Some(ino));
                }
                known_object =
                    (inode.kind() != Kind::Dir && inode.remote.is_some()).then(|| inode.kind());
            } else if self.journal().latest(&key).is_none() {
                // A directory listed within the TTL: a name it did not hold is absent, one it
                // held needs no listing again to tell a file from a directory.
                let listing = ns
                    .get(parent)
                    .filter(|p| self.listed_within_ttl(p))
                    .map(|p| p.listed_kinds.as_ref().and_then(|k| k.get(name).copied()));
                if ns.known_absent(parent, name, self.config.metadata_ttl) || listing == Some(None)
                {
                    return Ok(None);
                }
                listed_as = listed_as.or(listing.flatten());
            }
            (key, known_object)
        };
        loop {
            let latest = self
                .journal()
                .latest(&key)
                .map(|e| (e.seq, e.change.clone()));
            let (seq, pending) = latest.map_or((None, None), |(s, c)| (Some(s), Some(c)));
            // Whether the change log moved on while this resolve waited on I/O.
            let moved_on = || self.journal().latest(&key).map(|e| e.seq) != seq;
            match &pending {
                Some(Change::Delete | Change::DeleteDir) => {
                    let mut ns = self.ns();
                    if let Some(ino) = ns.child(parent, name) {
                        ns.detach(ino);
                    }
                    ns.mark_absent(parent, name);
                    return Ok(None);
                }
                Some(
                    change @ (Change::PutFile { .. }
                    | Change::PutDir { .. }
                    | Change::PutSymlink { .. }
                    | Change::Copy { .. }),
                ) => {
                    let (_, attrs) = change.outcome().expect("puts have an outcome");
                    let size = self.pending_size(change).await;
                    let remote = match change {
                        Change::Copy { etag, size, .. } => Some(Remote {
                            etag: crate::store::ETag(etag.clone()),
                            size: *size,
                        }),
                        _ => None,
                    };
                    let mut ns = self.ns();
                    if moved_on() {
                        continue;
                    }
                    let ino = match ns.child(parent, name) {
                        Some(ino)
                            if ns
                                .get(ino)
                                .is_some_and(|i| i.file.is_some() && i.kind() == attrs.kind()) =>
                        {
                            if let Some(inode) = ns.get_mut(ino) {
                                inode.checked = Instant::now();
                            }
                            ino
                        }
                        _ => ns.upsert(parent, name, attrs, size, remote),
                    };
                    if let (Change::PutSymlink { target, .. }, Some(inode)) =
                        (change, ns.get_mut(ino))
                    {
                        inode.target = Some(target.clone());
                    }
                    tracing::debug!("{key}: pending change {:?} (inode {ino})", seq);
                    return Ok(Some(ino));
                }
                _ => {}
            }
            let mut hint = listed_as.or(known_object);
            if listed_as.is_none() && self.relists(parent) {
                // A name in a directory the mount listed before, not too large: one listing
                // answers for this name and every other there for the TTL (a new name is absent
                // if not listed; a known one is confirmed if listed as it was), where asking per
                // name would take three requests for a new name and one for a known one: an
                // untar, a batch of new files, a `stat` of each file cost a listing per TTL.
                if let Ok((names, listed_at)) = self.entries_of(parent).await {
                    let names = Arc::new(names);
                    let mut ns = self.ns();
                    if let Some(dir) = ns.get_mut(parent) {
                        dir.listed_at = Some(listed_at);
                        dir.listed_names = names.len();
                        dir.listed_kinds = Some(Arc::clone(&names));
                    }
                    if moved_on() {
                        continue;
                    }
                    let child = ns.child(parent, name);
                    if let Some(ino) = child
                        && ns.get(ino).is_some_and(|inode| self.trusted(inode))
                    {
                        tracing::debug!("{key}: known (inode {ino}), found while relisting");
                        return Ok(Some(ino));
                    }
                    match names.get(name) {
                        None if child.is_none() => {
                            ns.mark_absent(parent, name);
                            return Ok(None);
                        }
                        None => {}
                        Some(kind) => hint = Some(*kind),
                    }
                }
            }
            let probed = if self.store_seems_down() {
                Err(FsError::Store(store_down()))
            } else {
                let probing = async {
                    // An object the mount knows is looked at again with one HEAD; only if it
                    // is gone does the name take the full probe.
                    match self.probe(&key, hint).await {
                        Ok(None) if listed_as.is_none() && known_object.is_some() => {
                            self.probe(&key, None).await
                        }
                        other => other,
                    }
                };
                let probed = tokio::time::timeout(METADATA_BUDGET, probing)
                    .await
                    .unwrap_or_else(|_| Err(FsError::Store(store_down())));
                self.note_store_reached(!matches!(&probed, Err(err) if timed_out(err)));
                probed
            };
            let found = match probed {
                Ok(found) => found,
                Err(err) if unreachable(&err) => {
                    let ns = self.ns();
                    if let Some(ino) = ns.child(parent, name) {
                        return Ok(Some(ino));
                    }
                    if ns.get(parent).is_some_and(|p| p.listed) {
                        return Ok(None);
                    }
                    return Err(err);
                }
                Err(err) => return Err(err),
            };
            let mut ns = self.ns();
            if moved_on() {
                continue;
            }
            match found {
                Some(found) => {
                    tracing::debug!("{key}: the store has it (hint {hint:?}): {found:?}");
                    let ino = self.install(&mut ns, parent, name, found);
                    if let (Some(Change::SetAttrs { attrs, .. }), Some(inode)) =
                        (&pending, ns.get_mut(ino))
                    {
                        inode.attrs = (*attrs).into();
                    }
                    return Ok(Some(ino));
                }
                None => {
                    if let Some(ino) = ns.child(parent, name) {
                        if ns.get(ino).is_some_and(|i| i.file.is_some()) {
                            return Ok(Some(ino));
                        }
                        ns.detach(ino);
                    }
                    ns.mark_absent(parent, name);
                    return Ok(None);
                }
            }
        }
    }

    /// Whether a miss in `dir` is answered by listing it again rather than by a probe: it was
    /// listed in full before (or made here), and its last listing was small.
    fn relists(&self, dir: u64) -> bool {
        self.ns()
            .get(dir)
            .is_some_and(|d| d.listed && d.listed_names <= RELIST_LIMIT)
    }

    async fn existing(&self, parent: u64, name: &str) -> FsResult<u64> {
        self.resolve(parent, name).await?.ok_or(FsError::NotFound)
    }

    fn count_lookup(&self, ino: u64) {
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.lookups += 1;
        }
    }

    // ----- metadata operations -----

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = check_name(name)?;
        if name.chars().any(|c| c.is_ascii_control()) {
            // A name cairn never stores is never asked of the store either.
            return Err(FsError::NotFound);
        }
        let ino = self.existing(parent, &name).await?;
        self.count_lookup(ino);
        self.note_direct_writes_to(ino).await?;
        self.attr(ino)
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.ns().forget(ino, count);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        self.note_direct_writes_to(ino).await?;
        let (parent, name) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if self.trusted(inode) || !ns.attached(ino) {
                return Ok(Self::attr_of(inode));
            }
            (inode.parent, inode.name.clone())
        };
        match self.resolve(parent, &name).await? {
            Some(found) if found == ino => self.attr(ino),
            _ => Err(FsError::NotFound),
        }
    }

    pub async fn setattr(&self, ino: u64, changes: SetAttrs) -> FsResult<Attr> {
        self.writable()?;
        let kind = self.attr(ino)?.kind;
        if let Some(size) = changes.size {
            if kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            self.truncate(ino, size).await?;
        }
        let attrs_changed = changes.mode.is_some()
            || changes.uid.is_some()
            || changes.gid.is_some()
            || changes.mtime.is_some();
        if attrs_changed {
            let mut ns = self.ns();
            let inode = ns.get_mut(ino).ok_or(FsError::NotFound)?;
            if let Some(mode) = changes.mode {
                inode.attrs.mode = (inode.attrs.mode & crate::attrs::S_IFMT) | (mode & 0o7777);
            }
            inode.attrs.uid = changes.uid.unwrap_or(inode.attrs.uid);
            inode.attrs.gid = changes.gid.unwrap_or(inode.attrs.gid);
            inode.attrs.mtime = changes.mtime.unwrap_or(inode.attrs.mtime);
            inode.ctime = SystemTime::now();
        }
        if attrs_changed || changes.size.is_some() {
            self.persist_attrs(ino, kind, changes.size.is_some())
                .await?;
        }
        self.attr(ino)
    }

    /// Records an inode's new attributes (and, for a file truncated while no one has it open,
    /// its new contents) in the change log.
    async fn persist_attrs(&self, ino: u64, kind: Kind, resized: bool) -> FsResult<()> {
        let data = self.ns().get(ino).and_then(|inode| inode.file.clone());
        if let Some(data) = &data
            && resized
            && data.opens.load(Ordering::Acquire) == 0
        {
            self.queue_upload(data, true).await?;
            return Ok(());
        }
        // New attributes of a changed file go with its contents when it is closed.
        let dirty = match &data {
            Some(data) => data.content.lock().await.dirty,
            None => false,
        };
        let _naming = self.naming.read().await;
        let (key, attrs, in_store) = {
            let ns = self.ns();
            if !ns.attached(ino) || ino == ROOT {
                return Ok(()); // Removed meanwhile; the root has no object of its own.
            }
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            (
                ns.key(ino).unwrap_or_default(),
                inode.attrs,
                inode.remote.is_some(),
            )
        };
        let stored = StoredAttrs::from(attrs);
        let update_key = key.clone();
        if self
            .log(move |j| j.update_attrs(&update_key, stored))
            .await?
            || dirty
        {
            return Ok(());
        }
        let change = Change::SetAttrs {
            kind: kind.into(),
            attrs: stored,
        };
        self.record(&key, change, in_store, true).await?;
        Ok(())
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<String> {
        let key = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Symlink {
                return Err(FsError::Invalid("not a symbolic link".into()));
            }
            if let Some(target) = &inode.target {
                return Ok(target.clone());
            }
            ns.key(ino).ok_or(FsError::NotFound)?
        };
        if let Some(Change::PutSymlink { target, .. }) =
            self.journal().latest(&key).map(|e| &e.change)
        {
            return Ok(target.clone());
        }
        let (_, body) = self.store.get_all(&self.fetch_key(&key)).await?;
        let target = String::from_utf8(body.to_vec())
            .map_err(|_| FsError::Invalid("the link target is not UTF-8".into()))?;
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.target = Some(target.clone());
        }
        Ok(target)
    }

    // ----- namespace operations -----

    /// Fails with EEXIST if `name` exists in `parent`; returns the new entry's key.
    async fn vacant(&self, parent: u64, name: &str) -> FsResult<String> {
        if self.resolve(parent, name).await?.is_some() {
            return Err(FsError::Exists);
        }
        Self::child_key(&self.ns(), parent, name)
    }

    fn new_attrs(kind: Kind, mode: u32, umask: u32, uid: u32, gid: u32) -> Attrs {
        Attrs {
            mode: kind.type_bits() | (mode & !umask & 0o7777),
            uid,
            gid,
            mtime: SystemTime::now(),
        }
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.writable()?;
        let name = check_new_name(name)?;
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Dir, mode, umask, uid, gid);
        let change = Change::PutDir {
            attrs: attrs.into(),
        };
        let ino = self
            .add_entry(parent, &name, &key, attrs, 0, change)
            .await?;
        if let Some(inode) = self.ns().get_mut(ino) {
            // New and empty: its listing is known.
            inode.listed = true;
            inode.listed_at = Some(Instant::now());
            inode.listed_kinds = None;
        }
        self.count_lookup(ino);
        self.attr(ino)
    }

    /// Adds a new name to the tree, then records its creation: in that order, so that the
    /// uploader always finds the inode to tell what the store now holds.
    async fn add_entry(
        &self,
        parent: u64,
        name: &str,
        key: &str,
        attrs: Attrs,
        size: u64,
        change: Change,
    ) -> FsResult<u64> {
        let ino = self.ns().upsert(parent, name, attrs, size, None);
        if let Err(err) = self.record(key, change, false, true).await {
            self.ns().detach(ino);
            return Err(err);
        }
        Ok(ino)
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.writable()?;
        let name = check_new_name(name)?;
        let target = std::str::from_utf8(target.as_bytes())
            .map_err(|_| FsError::Invalid("link targets must be valid UTF-8".into()))?
            .to_string();
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Symlink, 0o777, 0, uid, gid);
        let change = Change::PutSymlink {
            target: target.clone(),
            attrs: attrs.into(),
        };
        let ino = self
            .add_entry(parent, &name, &key, attrs, target.len() as u64, change)
            .await?;
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.target = Some(target);
        }
        self.count_lookup(ino);
        self.attr(ino)
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let name = check_name(name)?;
        let ino = self.existing(parent, &name).await?;
        let (key, data, in_store) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() == Kind::Dir {
                return Err(FsError::IsDir);
            }
            (
                ns.key(ino).ok_or(FsError::NotFound)?,
                inode.file.clone(),
                inode.remote.is_some(),
            )
        };
        if let Some(data) = &data
            && data.opens.load(Ordering::Acquire) > 0
        {
            // Still open somewhere: keep every byte locally, if the store can still give them.
            let mut content = data.content.lock().await;
            let size = data.size.load(Ordering::Acquire);
            if content.partial().is_some() {
                self.make_whole(&key, &mut content, size).await?;
            } else {
                let _ = self.materialize(&key, &mut content, size).await;
            }
            content.remote_limit = 0;
        }
        {
            let _naming = self.naming.write().await;
            self.record(&key, Change::Delete, in_store, false).await?;
            // Gone, as this mount knows: a new file of this name needs no probe within the TTL.
            let mut ns = self.ns();
            ns.detach(ino);
            ns.mark_absent(parent, &name);
        }
        let (cache, journal) = (self.cache.clone(), Arc::clone(&self.journal));
        let keep = data
            .as_ref()
            .is_some_and(|d| d.opens.load(Ordering::Acquire) > 0);
        blocking(move || match cache.lookup(&key)? {
            Some(cached)
                if !keep
                    && !journal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .uploads_cache_file(&cached.file) =>
            {
                cache.remove(&key)
            }
            _ => cache.forget(&key),
        })
        .await?;
        if let Some(data) = data
            && !keep
        {
            if let Some(inode) = self.ns().get_mut(ino) {
                inode.file = None; // Unlinked and closed: its contents go.
            }
            self.drop_cache_file_if_unused(&data).await;
        }
        Ok(())
    }

    /// The names, and kinds, of a directory's entries as this mount sees them: the store's
    /// listing with the pending changes applied. With the store unreachable, the last listing
    /// this mount made (if any) stands in for it.
    async fn entries_of(&self, ino: u64) -> FsResult<(HashMap<String, Kind>, Instant)> {
        let (prefix, listed_before) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            (ns.dir_prefix(ino).ok_or(FsError::NotFound)?, inode.listed)
        };
        let mut names: HashMap<String, Kind> = HashMap::new();
        let kept = self.listings().take(&prefix, self.config.metadata_ttl);
        // `listed_at`: when the listing started; `seen_at`: when what it shows was last seen
        // (a fresh listing's end, a kept page's start).
        let (listed, pending_before, listed_at, seen_at) = match kept {
            Some(kept) => (Ok(kept.page), kept.pending, kept.at, kept.at),
            None => {
                let started = Instant::now();
                // Pending changes as they stand before the listing: one the uploader applies
                // while the listing runs may be missing from both the listing and the log after.
                // (The count of recorded changes is read first: see `Listings::keep`.)
                let (flat, generation) = {
                    let listings = self.listings();
                    (!listings.is_too_big(&prefix), listings.generation())
                };
                let pending_below: Vec<(String, Option<Kind>)> = self
                    .journal()
                    .below(&prefix)
                    .filter(|e| flat || !e.key[prefix.len()..].contains('/'))
                    .map(|e| (e.key.clone(), e.change.outcome().map(|(kind, _)| kind)))
                    .collect();
                let listed = if self.store_seems_down() {
                    Err(store_down())
                } else {
                    let at = (started, generation);
                    let listing = self.list_store(&prefix, at, flat.then_some(&pending_below));
                    let listed = tokio::time::timeout(METADATA_BUDGET, listing)
                        .await
                        .unwrap_or_else(|_| Err(store_down()));
                    self.note_store_reached(
                        !matches!(&listed, Err(err) if err.kind() == ErrorKind::Timeout),
                    );
                    listed
                };
                let pending_before = listings::children_of(&prefix, &pending_below);
                (listed, pending_before, started, Instant::now())
            }
        };
        match listed {
            Ok(listed) => {
                self.confirm_children(ino, &prefix, &listed, seen_at);
                for prefix_entry in &listed.prefixes {
                    let name = prefix_entry[prefix.len()..].trim_end_matches('/');
                    if check_new_name(OsStr::new(name)).is_ok() {
                        names.insert(name.to_string(), Kind::Dir);
                    }
                }
                for object in &listed.objects {
                    let name = &object.key[prefix.len()..];
                    if check_new_name(OsStr::new(name)).is_ok() {
                        // A name that is both a file and a directory shows as the directory.
                        names.entry(name.to_string()).or_insert(Kind::File);
                    }
                }
            }
            Err(err) if listed_before && unreachable(&FsError::Store(err.clone())) => {
                let ns = self.ns();
                for (name, child) in ns.children(ino) {
                    if let Some(inode) = ns.get(child) {
                        names.insert(name.clone(), inode.kind());
                    }
                }
            }
            Err(err) => return Err(err.into()),
        }
        for (name, kind) in pending_before
            .into_iter()
            .chain(self.pending_children(&prefix))
        {
            match kind {
                Some(kind) => {
                    names.insert(name, kind);
                }
                None => {
                    names.remove(&name);
                }
            }
        }
        // Names this mount holds open or changed stay, whatever the listing says.
        let ns = self.ns();
        for (name, child) in ns.children(ino) {
            if let Some(inode) = ns.get(child).filter(|c| c.file.is_some()) {
                names.entry(name.clone()).or_insert(inode.kind());
            }
        }
        Ok((names, listed_at))
    }

    /// Lists directory `prefix` in the store. With `pending_below` (the changes pending below
    /// it when the listing started, `at` a time and a count of recorded changes), first without
    /// a delimiter: if everything below fits in one page, that listing answers for the
    /// directories inside too. (One page only: s3rver, for one, loses keys across the pages of a
    /// listing without a delimiter, `a.rs` beside a full `a/`.)
    async fn list_store(
        &self,
        prefix: &str,
        at: (Instant, u64),
        pending_below: Option<&Vec<(String, Option<Kind>)>>,
    ) -> crate::store::Result<ListPage> {
        if let Some(pending) = pending_below {
            let page = self.store.list(prefix, ListOptions::default()).await?;
            if page.next.is_none() {
                let keys = page.objects.len();
                let mut pages = listings::split_flat(prefix, page.objects);
                let own = pages.remove(prefix).unwrap_or_default();
                let ttl = self.config.metadata_ttl;
                let kept = self.listings().keep(at, pages, pending, ttl);
                tracing::debug!("{prefix}: listed flat, {keys} keys, {kept} pages kept");
                return Ok(own);
            }
            tracing::debug!("{prefix}: too much below to list flat");
            self.listings().mark_too_big(prefix);
        }
        self.store.list_all(prefix, true).await
    }

    /// A listing of `dir` made `at` showed these names as the mount knows them (the same
    /// version of a file, a directory as a directory): trust them afresh, so that the lookups
    /// of an `ls -l` or `rm -r` that follows need not ask the store about each name again.
    fn confirm_children(
        &self,
        dir: u64,
        prefix: &str,
        listed: &crate::store::ListPage,
        at: Instant,
    ) {
        let mut ns = self.ns();
        for object in &listed.objects {
            let name = &object.key[prefix.len()..];
            let Some(child) = ns.child(dir, name) else {
                continue;
            };
            if let Some(inode) = ns.get_mut(child)
                && inode.kind() == Kind::File
                && inode
                    .remote
                    .as_ref()
                    .is_some_and(|r| r.etag == object.etag && r.size == object.size)
            {
                inode.checked = inode.checked.max(at);
            }
        }
        for dir_prefix in &listed.prefixes {
            let name = dir_prefix[prefix.len()..].trim_end_matches('/');
            if let Some(child) = ns.child(dir, name)
                && let Some(inode) = ns.get_mut(child)
                && inode.kind() == Kind::Dir
            {
                inode.checked = inode.checked.max(at);
            }
        }
    }

    /// The pending changes of a directory's entries: a name and what it becomes (None: gone).
    fn pending_children(&self, prefix: &str) -> Vec<(String, Option<Kind>)> {
        self.journal()
            .children(prefix)
            .map(|e| {
                (
                    e.key[prefix.len()..].to_string(),
                    e.change.outcome().map(|(kind, _)| kind),
                )
            })
            .collect()
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let name = check_name(name)?;
        let ino = self.existing(parent, &name).await?;
        let (key, in_store) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            (
                ns.key(ino).ok_or(FsError::NotFound)?,
                inode.remote.is_some(),
            )
        };
        // A listing made within the TTL (as `rm -r` makes before it removes the entries) that
        // every name has since left here: empty, as far as lookups would tell.
        let empty = match self.listed_lately(ino) {
            Some(names) if names.is_empty() => self
                .pending_children(&format!("{key}/"))
                .iter()
                .all(|(_, kind)| kind.is_none()),
            _ => self.entries_of(ino).await?.0.is_empty(),
        };
        if !empty {
            return Err(FsError::NotEmpty);
        }
        self.record(&key, Change::DeleteDir, in_store, false)
            .await?;
        let mut ns = self.ns();
        ns.detach(ino);
        ns.mark_absent(parent, &name);
        Ok(())
    }

    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> FsResult<()> {
        self.writable()?;
        let (name, new_name) = (check_name(name)?, check_new_name(new_name)?);
        let source = self.existing(parent, &name).await?;
        let target = self.resolve(new_parent, &new_name).await?;
        if target == Some(source) {
            return Ok(());
        }
        let (source_kind, source_key, target_key) = {
            let ns = self.ns();
            let inode = ns.get(source).ok_or(FsError::NotFound)?;
            let target_key = Self::child_key(&ns, new_parent, &new_name)?;
            (
                inode.kind(),
                ns.key(source).ok_or(FsError::NotFound)?,
                target_key,
            )
        };
        let mut target_in_store = false;
        if let Some(target) = target {
            if no_replace {
                return Err(FsError::Exists);
            }
            let target_kind = self.attr(target)?.kind;
            match (source_kind, target_kind) {
                (Kind::Dir, Kind::Dir) if !self.entries_of(target).await?.0.is_empty() => {
                    return Err(FsError::NotEmpty);
                }
                (Kind::Dir, Kind::Dir) => {}
                (Kind::Dir, _) => return Err(FsError::NotDir),
                (_, Kind::Dir) => return Err(FsError::IsDir),
                _ => {}
            }
            target_in_store = self.ns().get(target).is_some_and(|t| t.remote.is_some());
        }
        if source_kind == Kind::Dir {
            if target_key.starts_with(&format!("{source_key}/")) {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            // Directories move in the store, after everything before them is there.
            self.drain(Some(Duration::from_secs(60))).await?;
            self.rename_dir(&source_key, &target_key).await?;
            self.ns().move_to(source, new_parent, &new_name);
            let cache = self.cache.clone();
            let (from, to) = (format!("{source_key}/"), format!("{target_key}/"));
            blocking(move || cache.rename(&from, &to, true)).await?;
            return Ok(());
        }
        // A partial file's base version is about to go (its key is deleted or replaced): fetch
        // the rest first, for the file that moves and for an open file that is replaced.
        self.make_whole_file(source, &source_key).await?;
        let target_open = target.is_some_and(|target| {
            self.ns()
                .get(target)
                .and_then(|i| i.file.as_ref())
                .is_some_and(|f| f.opens.load(Ordering::Acquire) > 0)
        });
        if let Some(target) = target
            && target_open
        {
            self.make_whole_file(target, &target_key).await?;
        }
        let (moved, _naming) = loop {
            let moved = self.moved_version(source, &source_key).await?;
            let naming = self.naming.write().await;
            // A close through another handle may have recorded new contents in between, which
            // a copy of the stored version would miss.
            let recorded_meanwhile = matches!(moved, Change::Copy { .. })
                && matches!(
                    self.journal().latest(&source_key).map(|e| &e.change),
                    Some(Change::PutFile { .. })
                );
            if !recorded_meanwhile {
                break (moved, naming);
            }
        };
        let source_in_store = self.ns().get(source).is_some_and(|s| s.remote.is_some());
        // The tree and the cache index move first, so that the uploader, once the change is
        // recorded, finds the file under its new name.
        self.ns().move_to(source, new_parent, &new_name);
        if let Some(inode) = self.ns().get_mut(source) {
            inode.ctime = SystemTime::now();
        }
        let (cache, from, to) = (self.cache.clone(), source_key.clone(), target_key.clone());
        blocking(move || cache.rename(&from, &to, false)).await?;
        let changed = [source_key.clone(), target_key.clone()];
        for key in &changed {
            self.listings().changed(key);
        }
        let recorded = self
            .log(move |j| {
                if matches!(moved, Change::Copy { .. }) {
                    // The copy must come before the delete of its source: take the source's
                    // waiting change (its attributes are in the copy) out of the way.
                    j.discard(&source_key)?;
                }
                j.record(&target_key, moved, target_in_store, SystemTime::now())?;
                j.record(
                    &source_key,
                    Change::Delete,
                    source_in_store,
                    SystemTime::now(),
                )?;
                Ok(())
            })
            .await;
        for key in &changed {
            self.listings().changed(key);
        }
        recorded
    }

    /// What a renamed file becomes at its new key: its local version (contents in a cache file,
    /// or a symlink), or a copy of its object in the store.
    async fn moved_version(&self, ino: u64, key: &str) -> FsResult<Change> {
        let (attrs, remote, data, target) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            (
                inode.attrs,
                inode.remote.clone(),
                inode.file.clone(),
                inode.target.clone(),
            )
        };
        let stored = StoredAttrs::from(attrs);
        let pending = self.journal().latest(key).map(|e| e.change.clone());
        match pending {
            Some(Change::PutFile { cache_file, .. }) => {
                return Ok(Change::PutFile {
                    cache_file,
                    attrs: stored,
                });
            }
            Some(Change::PutSymlink { target, .. }) => {
                return Ok(Change::PutSymlink {
                    target,
                    attrs: stored,
                });
            }
            Some(Change::Copy { etag, size, .. }) => {
                // Renamed again before its first copy reached the store. Chaining the copies
                // would put the second after the delete of the first's source: move the
                // contents from the cache if it holds all of them, else let the first copy land
                // and copy from here.
                let (cache, name) = (self.cache.clone(), key.to_string());
                let cached = blocking(move || cache.lookup(&name)).await?;
                if let Some(cached) = cached
                    && cached.etag.0 == etag
                    && cached.present.contains(0..size)
                {
                    return Ok(Change::PutFile {
                        cache_file: cached.file,
                        attrs: stored,
                    });
                }
                self.wait_until_stored(key).await?;
                return Box::pin(self.moved_version(ino, key)).await;
            }
            _ => {}
        }
        if let Some(data) = data {
            let content = data.content.lock().await;
            if content.dirty {
                return Ok(Change::PutFile {
                    cache_file: content.cache_name.clone(),
                    attrs: stored,
                });
            }
        }
        if attrs.kind() == Kind::Symlink {
            let target = match target {
                Some(target) => target,
                None => self.readlink(ino).await?,
            };
            return Ok(Change::PutSymlink {
                target,
                attrs: stored,
            });
        }
        let remote = remote.ok_or(FsError::NotFound)?;
        Ok(Change::Copy {
            from: key.to_string(),
            etag: remote.etag.0,
            size: remote.size,
            attrs: stored,
        })
    }

    /// Waits until the pending changes of `key` are in the store (at most a minute).
    async fn wait_until_stored(&self, key: &str) -> FsResult<()> {
        let name = key.to_string();
        self.log(move |j| j.hurry(&name)).await?;
        self.wake.notify_one();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.journal().latest(key).is_some() {
            if Instant::now() > deadline {
                return Err(FsError::Store(crate::store::StoreError::new(
                    ErrorKind::Unavailable,
                    format!("{key}: its earlier rename has not reached the store after a minute"),
                )));
            }
            let notified = self.progress.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        Ok(())
    }

    /// Copies every object under `from/` to `to/`, then deletes the originals. Not atomic: a
    /// reader elsewhere may see both trees, or part of the new one, while it runs.
    async fn rename_dir(&self, from: &str, to: &str) -> FsResult<()> {
        let (from, to) = (format!("{from}/"), format!("{to}/"));
        // Pages kept from a listing of a tree above would still show the old names.
        self.listings().clear();
        let listed = self.store.list_all(&from, false).await?;
        let keys: Vec<String> = listed.objects.into_iter().map(|o| o.key).collect();
        let copies: Vec<(String, String)> = keys
            .iter()
            .map(|key| (key.clone(), format!("{to}{}", &key[from.len()..])))
            .collect();
        stream::iter(copies)
            .map(|(key, dest)| async move { self.store.copy(&key, &dest, None).await })
            .buffer_unordered(self.config.concurrency)
            .try_collect::<Vec<_>>()
            .await?;
        if !keys.contains(&from) {
            // No marker came along: make sure the new directory exists even when empty.
            let attrs = Attrs::decode(
                &Default::default(),
                Kind::Dir,
                SystemTime::now(),
                &self.config.defaults,
            );
            let options = PutOptions::with_metadata(attrs.encode());
            self.store.put(&to, Bytes::new(), options).await?;
        }
        self.store.delete_many(&keys).await?;
        self.listings().clear();
        Ok(())
    }

    // ----- directories -----

    /// Opens a directory: its first read lists it, and later reads page through that listing.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        if self.attr(ino)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles()
            .insert(fh, Handle::Dir { ino, entries: None });
        Ok(fh)
    }

    /// Whether directory `dir` was listed (or made) within the TTL.
    fn listed_within_ttl(&self, dir: &Inode) -> bool {
        dir.listed_at
            .is_some_and(|at| at.elapsed() < self.config.metadata_ttl)
    }

    /// The names of directory `ino` as this mount holds them, if it listed the directory in
    /// full (or made it) within the TTL: every name since made or removed here is in them.
    fn listed_lately(&self, ino: u64) -> Option<HashMap<String, Kind>> {
        let ns = self.ns();
        let dir = ns.get(ino)?;
        let fresh = dir.listed && dir.listed_kinds.is_none() && self.listed_within_ttl(dir);
        fresh.then(|| {
            ns.children(ino)
                .filter_map(|(name, child)| Some((name.clone(), ns.get(child)?.kind())))
                .collect()
        })
    }

    /// The entries of directory `ino`, "." and ".." first: one listing of the store (unless
    /// one made within the TTL still stands), each entry's attributes fetched in parallel.
    async fn list_dir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let lately = self.listed_lately(ino);
        let from_store = lately.is_none();
        // When the listing was made (the store's answer may come from a listing of a
        // directory above, made a moment ago).
        let (names, started) = match lately {
            Some(names) => (names, Instant::now()),
            None => self.entries_of(ino).await?,
        };
        let mut entries: Vec<DirEntry> = stream::iter(names)
            .map(|(name, kind)| async move {
                match self.resolve_listed(ino, &name, Some(kind)).await {
                    Ok(Some(child)) => Some(self.attr(child).map(|attr| DirEntry { name, attr })),
                    Ok(None) => None, // Gone since the listing.
                    Err(err) => Some(Err(err)),
                }
            })
            .buffer_unordered(32)
            .filter_map(|entry| async move { entry })
            .try_collect()
            .await?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if from_store {
            // Forget children that are no longer there; the listing is now complete.
            let mut ns = self.ns();
            let listed: std::collections::HashSet<&str> =
                entries.iter().map(|e| e.name.as_str()).collect();
            // Only what the mount knew before the listing started: a name made or changed here
            // meanwhile stays.
            let gone: Vec<u64> = ns
                .children(ino)
                .filter(|(name, _)| !listed.contains(name.as_str()))
                .map(|(_, child)| child)
                .filter(|child| {
                    ns.get(*child)
                        .is_some_and(|c| c.file.is_none() && c.checked < started)
                })
                .collect();
            for child in gone {
                ns.detach(child);
            }
            if let Some(inode) = ns.get_mut(ino) {
                inode.listed = true;
                inode.listed_at = Some(started);
                inode.listed_names = entries.len();
                inode.listed_kinds = None;
            }
        }
        let own = self.attr(ino)?;
        let parent_ino = self
            .ns()
            .get(ino)
            .map_or(ROOT, |i| if i.parent == 0 { ROOT } else { i.parent });
        let parent = self.attr(parent_ino).unwrap_or(own);
        let mut all = vec![
            DirEntry {
                name: ".".into(),
                attr: own,
            },
            DirEntry {
                name: "..".into(),
                attr: parent,
            },
        ];
        all.extend(entries);
        Ok(all)
    }

    /// Entries of an open directory from `offset` on (offsets count entries, "." and ".." first).
    pub async fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let (ino, listed) = match self.handles().get(&fh) {
            Some(Handle::Dir { ino, entries }) => (*ino, entries.clone()),
            _ => return Err(FsError::BadHandle),
        };
        let entries = match listed {
            Some(entries) => entries,
            None => {
                let entries = Arc::new(self.list_dir(ino).await?);
                if let Some(Handle::Dir { entries: kept, .. }) = self.handles().get_mut(&fh) {
                    *kept = Some(Arc::clone(&entries));
                }
                entries
            }
        };
        Ok(entries.iter().skip(offset as usize).cloned().collect())
    }

    /// The kernel took an entry of a `readdirplus` reply as a lookup.
    pub fn took_entry(&self, ino: u64) {
        self.count_lookup(ino);
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles().remove(&fh);
    }

    pub fn statfs(&self) -> Statfs {
        Statfs {
            blocks: 1 << 40,
            free: 1 << 40,
            files: 1 << 30,
            free_files: 1 << 30,
            block_size: 4096,
            name_max: NAME_MAX as u32,
        }
    }

    // ----- files -----

    /// The key to read a file's store version from: its own, or while a rename is pending, the
    /// key it was copied from.
    fn fetch_key(&self, key: &str) -> String {
        match self.journal().latest(key).map(|e| &e.change) {
            Some(Change::Copy { from, .. }) => from.clone(),
            _ => key.to_string(),
        }
    }

    /// The open state of a file's contents: from a pending change's cache file, or from the
    /// cache index, on first use.
    async fn file_data(&self, ino: u64) -> FsResult<Arc<FileData>> {
        // The common case, on every read and write: the file is already open here.
        if let Some(data) = self.ns().get(ino).and_then(|i| i.file.clone()) {
            return Ok(data);
        }
        let mut registry = self.files.lock().await;
        // Read the inode and the change log together: the uploader records the store's new
        // version in the inode before it drops the change, so one of the two always tells.
        let (key, remote, size, pending_file) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            match inode.kind() {
                Kind::Dir => return Err(FsError::IsDir),
                Kind::Symlink => {
                    return Err(FsError::Invalid("a symbolic link has no contents".into()));
                }
                Kind::File => {}
            }
            if let Some(data) = &inode.file {
                return Ok(Arc::clone(data));
            }
            let key = ns.key(ino).unwrap_or_default();
            let pending_file = match self.journal().latest(&key).map(|e| &e.change) {
                Some(Change::PutFile { cache_file, .. }) => Some(cache_file.clone()),
                _ => None,
            };
            (key, inode.remote.clone(), inode.size, pending_file)
        };
        let (content, size) = match (pending_file, remote) {
            (Some(cache_name), _) => {
                let cache = self.cache.clone();
                let name = cache_name.clone();
                let (file, length, partial) = blocking(move || {
                    let file = cache.open_file(&name)?;
                    let length = file.metadata()?.len();
                    Ok((file, length, cache.partial(&name)?))
                })
                .await?;
                let (present, changed, etag, remote_limit) = match partial {
                    Some(partial) => (
                        partial.changed.clone(),
                        partial.changed,
                        Some(partial.etag),
                        partial.base_end,
                    ),
                    None => (RangeSet::full(length), RangeSet::default(), None, 0),
                };
                let content = Content {
                    cache_name,
                    file: Arc::new(file),
                    present,
                    etag,
                    remote_limit,
                    dirty: true,
                    generation: 0,
                    queued_generation: 0,
                    dirty_since: None,
                    kernel_cached: None,
                    changed,
                    fetching: Vec::new(),
                    upload_readers: Arc::default(),
                    routes: direct::Routes::default(),
                };
                (content, length)
            }
            (None, Some(remote)) => {
                let journal = Arc::clone(&self.journal);
                let cache = self.cache.clone();
                let etag = remote.etag.clone();
                let (cache_name, file, present) = blocking(move || match cache.lookup(&key)? {
                    Some(cached) if cached.etag == etag && cache.has_file(&cached.file) => {
                        let file = cache.open_file(&cached.file)?;
                        let mut present = cached.present;
                        present.truncate(size);
                        cache.touch(&cached.file);
                        Ok((cached.file, file, present))
                    }
                    stale => {
                        if let Some(stale) = stale {
                            // Best effort on a full disk: a row whose file is gone is stale too.
                            let _ = cache.forget(&key);
                            let journal = journal.lock().unwrap_or_else(|p| p.into_inner());
                            if !journal.uploads_cache_file(&stale.file) {
                                cache.discard_file(&stale.file);
                            }
                        }
                        let (name, file) = cache.new_file()?;
                        Ok((name, file, RangeSet::default()))
                    }
                })
                .await?;
                let content = Content {
                    cache_name,
                    file: Arc::new(file),
                    present,
                    etag: Some(remote.etag.clone()),
                    remote_limit: remote.size.min(size),
                    dirty: false,
                    generation: 0,
                    queued_generation: 0,
                    dirty_since: None,
                    kernel_cached: None,
                    changed: RangeSet::default(),
                    fetching: Vec::new(),
                    upload_readers: Arc::default(),
                    routes: direct::Routes::default(),
                };
                (content, size)
            }
            (None, None) => {
                return Err(FsError::Io(std::io::Error::other(format!(
                    "{key} has no contents: none waiting here and none known in the store"
                ))));
            }
        };
        let name = content.cache_name.clone();
        let data = Arc::new(FileData {
            ino,
            content: tokio::sync::Mutex::new(content),
            size: AtomicU64::new(size),
            opens: AtomicUsize::new(0),
            direct_writers: AtomicUsize::new(0),
        });
        registry.insert(name, Arc::downgrade(&data));
        let mut ns = self.ns();
        let inode = ns.get_mut(ino).ok_or(FsError::NotFound)?;
        Ok(Arc::clone(inode.file.get_or_insert(data)))
    }

    /// A new file's contents: an empty cache file, changed from the start.
    async fn new_file_data(&self, ino: u64) -> FsResult<Arc<FileData>> {
        let mut registry = self.files.lock().await;
        let cache = self.cache.clone();
        let (name, file) = blocking(move || cache.new_file()).await?;
        let data = Arc::new(FileData {
            ino,
            content: tokio::sync::Mutex::new(Content {
                cache_name: name.clone(),
                file: Arc::new(file),
                present: RangeSet::default(),
                etag: None,
                remote_limit: 0,
                dirty: true,
                generation: 0,
                queued_generation: 0,
                dirty_since: None,
                kernel_cached: None,
                changed: RangeSet::default(),
                fetching: Vec::new(),
                upload_readers: Arc::default(),
                routes: direct::Routes::default(),
            }),
            size: AtomicU64::new(0),
            opens: AtomicUsize::new(0),
            direct_writers: AtomicUsize::new(0),
        });
        registry.insert(name, Arc::downgrade(&data));
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.file = Some(Arc::clone(&data));
        }
        Ok(data)
    }

    fn new_handle(&self, ino: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle::File {
            ino,
            next_offset: 0,
            window: self.config.block_size,
            route: direct::Route::Opening,
        };
        self.handles().insert(fh, handle);
        fh
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let truncates = flags & libc::O_TRUNC != 0;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || truncates;
        if writes {
            self.writable()?;
        }
        self.getattr(ino).await?; // Close-to-open: see the store's latest version.
        let data = self.file_data(ino).await?;
        data.opens.fetch_add(1, Ordering::AcqRel);
        let keep_cache = {
            let mut content = data.content.lock().await;
            // A truncating open (the kernel leaves O_TRUNC to the mount) drops the page cache.
            let keep = !truncates
                && content.kernel_cached.is_some()
                && content.kernel_cached == content.etag;
            content.kernel_cached = content.etag.clone();
            keep
        };
        let fh = self.new_handle(ino);
        let truncated = if truncates {
            self.truncate(ino, 0).await
        } else {
            Ok(())
        };
        let open = match (writes, truncates) {
            (false, _) => Open::Reads,
            (true, false) => Open::Writes,
            (true, true) => Open::WritesAfresh,
        };
        let routed = match truncated {
            Ok(()) => self.choose_route(fh, &data, open).await,
            Err(err) => Err(err),
        };
        match routed {
            Ok(direct) => Ok(Opened {
                fh,
                keep_cache,
                direct,
            }),
            Err(err) => {
                self.release(fh).await.ok();
                Err(err)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Attr, Opened)> {
        self.writable()?;
        let name = check_new_name(name)?;
        if let Some(existing) = self.resolve(parent, &name).await? {
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::Exists);
            }
            if self.attr(existing)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let opened = self.open(existing, flags).await?;
            self.count_lookup(existing);
            return Ok((self.attr(existing)?, opened));
        }
        let key = Self::child_key(&self.ns(), parent, &name)?;
        let attrs = Self::new_attrs(Kind::File, mode, umask, uid, gid);
        let ino = self.ns().upsert(parent, &name, attrs, 0, None);
        let data = self.new_file_data(ino).await?;
        data.opens.fetch_add(1, Ordering::AcqRel);
        let cache_file = data.content.lock().await.cache_name.clone();
        let change = Change::PutFile {
            cache_file,
            attrs: attrs.into(),
        };
        if let Err(err) = self.record(&key, change, false, true).await {
            self.ns().detach(ino);
            return Err(err);
        }
        self.count_lookup(ino);
        let fh = self.new_handle(ino);
        let direct = match self.choose_route(fh, &data, Open::WritesAfresh).await {
            Ok(direct) => direct,
            Err(err) => {
                self.release(fh).await.ok();
                return Err(err);
            }
        };
        Ok((
            self.attr(ino)?,
            Opened {
                fh,
                keep_cache: false,
                direct,
            },
        ))
    }

    fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        match self.handles().get(&fh) {
            Some(Handle::File { ino, .. }) => Ok(*ino),
            _ => Err(FsError::BadHandle),
        }
    }

    /// The read-ahead window for a read at `offset`, growing while reads are sequential. The
    /// kernel sends its own read-ahead as several reads at once, which may arrive out of order:
    /// a read within a block of where the last ended still counts as sequential.
    fn readahead(&self, fh: u64, offset: u64, size: u64) -> u64 {
        let mut handles = self.handles();
        let Some(Handle::File {
            next_offset,
            window,
            ..
        }) = handles.get_mut(&fh)
        else {
            return 0;
        };
        let block = self.config.block_size;
        let sequential = offset > 0 && offset.abs_diff(*next_offset) <= block;
        if sequential {
            *window = (*window * 2).min(self.config.max_readahead);
            *next_offset = (*next_offset).max(offset + size);
        } else {
            *window = block;
            *next_offset = offset + size;
        }
        *window
    }

    /// Makes `want` (clipped to what the store holds) present in the cache file, fetching the
    /// missing blocks with several requests in flight, while the caller holds the file's lock.
    async fn fetch(&self, key: &str, content: &mut Content, want: Range<u64>) -> FsResult<()> {
        let limit = content.remote_limit;
        if want.start >= limit {
            return Ok(());
        }
        let want_end = want.end.min(limit);
        if content.present.contains(want.start..want_end) {
            return Ok(());
        }
        let block = self.config.block_size;
        let start = want.start / block * block;
        let end = want_end.div_ceil(block).saturating_mul(block).min(limit);
        // Half a part a request: each body is held whole until written (read-ahead streams
        // its larger requests instead, see readahead.rs).
        let chunk = block.max(self.config.part_size / 2);
        let pieces: Vec<Range<u64>> = content
            .present
            .missing(start..end)
            .into_iter()
            .flat_map(|gap| {
                (gap.start..gap.end)
                    .step_by(chunk as usize)
                    .map(move |s| s..(s + chunk).min(gap.end))
            })
            .collect();
        let wanted: u64 = pieces.iter().map(|p| p.end - p.start).sum();
        let cache = self.cache.clone();
        if wanted > 0 && !blocking(move || Ok(cache.room_for(wanted))).await? {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        let etag = content.etag.clone();
        let file = Arc::clone(&content.file);
        let source = self.fetch_key(key);
        let fetched: Vec<Range<u64>> = stream::iter(pieces)
            .map(|piece| {
                let (etag, file, source) = (etag.clone(), Arc::clone(&file), source.clone());
                async move {
                    let options = GetOptions {
                        range: Some(piece.clone()),
                        if_match: etag,
                    };
                    let got = match self.store.get(&source, options.clone()).await {
                        // A renamed file's copy landed, and its source went, while this asked:
                        // the bytes are under the file's own name now.
                        Err(err)
                            if err.kind() == ErrorKind::NotFound
                                && source != key
                                && self.fetch_key(key) == key =>
                        {
                            self.store.get(key, options).await?
                        }
                        got => got?,
                    };
                    let range = got.range.clone();
                    blocking(move || {
                        cache::write_fetched(&file, &got.body, range.start)?;
                        Ok(range)
                    })
                    .await
                }
            })
            .buffer_unordered(self.config.concurrency)
            .try_collect()
            .await?;
        for range in fetched {
            content.present.insert(range);
        }
        if let Some(etag) = &content.etag
            && !content.dirty
        {
            let (cache, key, name, etag, present) = (
                self.cache.clone(),
                key.to_string(),
                content.cache_name.clone(),
                etag.clone(),
                content.present.clone(),
            );
            if let Err(err) = blocking(move || cache.record(&key, &name, &etag, &present)).await {
                // The bytes are cached all the same; the index forgets them (a full disk).
                tracing::warn!(
                    "could not record what is cached of {}: {err}",
                    content.cache_name
                );
            }
        }
        Ok(())
    }

    /// Whether a file about to change may keep its unfetched bytes in the store: it is large,
    /// its object is under its own key (no rename is pending), and it is not all cached.
    fn may_stay_partial(&self, key: &str, content: &Content, size: u64) -> bool {
        let base_end = content.remote_limit.min(size);
        !key.is_empty()
            && content.etag.is_some()
            && base_end >= self.config.copy_threshold
            && self.fetch_key(key) == key
            && !content.present.contains(0..base_end)
    }

    /// Fetches what a partial file lacks, so that it no longer needs its base version (before
    /// that version's key is renamed or replaced).
    async fn make_whole(&self, key: &str, content: &mut Content, size: u64) -> FsResult<()> {
        if content.partial().is_none() {
            return Ok(());
        }
        self.materialize(key, content, size).await?;
        content.remote_limit = 0;
        content.present = RangeSet::full(size);
        let (cache, name) = (self.cache.clone(), content.cache_name.clone());
        blocking(move || cache.forget_partial(&name)).await
    }

    /// [`Self::make_whole`] for the file `ino`, whether open or only waiting for its upload.
    async fn make_whole_file(&self, ino: u64, key: &str) -> FsResult<()> {
        let open = self.ns().get(ino).and_then(|i| i.file.clone());
        let data = match open {
            Some(data) => data,
            None => {
                let pending = matches!(
                    self.journal().latest(key).map(|e| &e.change),
                    Some(Change::PutFile { .. })
                );
                if !pending {
                    return Ok(());
                }
                self.file_data(ino).await?
            }
        };
        let mut content = data.content.lock().await;
        let size = data.size.load(Ordering::Acquire);
        self.make_whole(key, &mut content, size).await
    }

    /// Fetches every byte below `size` the store still holds, so the cache file is the whole file.
    /// If the store's version is no longer the one cached (replaced since: by another host, or
    /// by this one before a crash), the clean bytes give way to it.
    async fn materialize(&self, key: &str, content: &mut Content, size: u64) -> FsResult<()> {
        match self.fetch(key, content, 0..size).await {
            Err(FsError::Store(err)) if err.kind() == ErrorKind::PreconditionFailed => {
                let info = self.store.head(&self.fetch_key(key)).await?;
                tracing::info!("{key} changed in the store; taking its current version");
                content.present = RangeSet::default();
                content.etag = Some(info.etag);
                content.remote_limit = info.size;
                self.fetch(key, content, 0..size).await
            }
            other => other,
        }
    }

    /// Marks the contents changed locally: the index stops describing them. A large stored
    /// file not all cached keeps the rest in the store (see [`Content::partial`]); any other
    /// fetches what it lacks first.
    async fn make_dirty(&self, ino: u64, content: &mut Content, size: u64) -> FsResult<()> {
        if Arc::strong_count(&content.upload_readers) > 1 && !Self::held_by_kernel(content) {
            self.copy_aside(content).await?;
        }
        if !content.dirty {
            // An unlinked file still open has no key, and nothing left to fetch.
            let key = self.key_of(ino).unwrap_or_default();
            if self.may_stay_partial(&key, content, size) {
                content.remote_limit = content.remote_limit.min(size);
                content.dirty = true;
                content.changed = RangeSet::default();
                let partial = content
                    .partial()
                    .expect("a partial file has a base version");
                let (cache, file, name) = (
                    self.cache.clone(),
                    Arc::clone(&content.file),
                    content.cache_name.clone(),
                );
                blocking(move || {
                    // The cache file is as long as the file, its unfetched parts holes.
                    if file.metadata()?.len() < size {
                        file.set_len(size)?;
                    }
                    cache.forget(&key)?;
                    cache.record_partial(&name, &partial)
                })
                .await?;
            } else {
                self.materialize(&key, content, size).await?;
                content.dirty = true;
                content.remote_limit = 0;
                content.present = RangeSet::full(size);
                let cache = self.cache.clone();
                blocking(move || cache.forget(&key)).await?;
            }
        }
        content.generation += 1;
        content.dirty_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Copy on write: the uploader is reading this file's cache file, so before the file
    /// changes, its bytes move to a copy that takes the cache file's place; the upload goes on
    /// reading the version it started with. A partial file's copy holds only the bytes it has.
    async fn copy_aside(&self, content: &mut Content) -> FsResult<()> {
        let path = self.cache.path_of(&content.cache_name);
        let copy = self.cache.snapshot_path();
        let spans = content.partial().map(|_| content.present.clone());
        let file = blocking(move || {
            // The directory is synced too: an fsync of the file (fsync=local) must find the
            // copy under the cache file's name after a power loss.
            let replaced = upload::copy_cache_file(&path, &copy, spans.as_ref())
                .and_then(|_| std::fs::rename(&copy, &path))
                .and_then(|()| File::open(path.parent().unwrap_or(&path))?.sync_all());
            if let Err(err) = replaced {
                let _ = std::fs::remove_file(&copy);
                return Err(err.into());
            }
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?)
        })
        .await?;
        content.file = Arc::new(file);
        content.upload_readers = Arc::default();
        Ok(())
    }

    /// A read answered on the spot, with no task and no blocking thread, where it can be: the
    /// file's lock is free, the cache file holds every stored byte from `offset` on (nothing to
    /// fetch or read ahead), and the page cache holds the bytes asked for. `None`: ask
    /// [`Filesystem::read`].
    pub fn read_at_once(&self, fh: u64, offset: u64, size: u32) -> Option<Bytes> {
        let ino = self.handle_ino(fh).ok()?;
        let data = self.ns().get(ino)?.file.clone()?;
        let content = data.content.try_lock().ok()?;
        let end = (offset + u64::from(size)).min(data.size.load(Ordering::Acquire));
        let limit = content.remote_limit;
        if offset >= end || (offset < limit && !content.present.contains(offset..limit)) {
            return None;
        }
        let file = Arc::clone(&content.file);
        drop(content);
        let bytes = read_if_in_memory(&file, offset..end)?;
        self.readahead(fh, offset, u64::from(size));
        self.metrics.cache_read(true);
        Some(Bytes::from(bytes))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let ino = self.handle_ino(fh)?;
        let data = self.file_data(ino).await?;
        let key = self.key_of(ino).unwrap_or_default();
        let window = self.readahead(fh, offset, size as u64);
        let mut content = data.content.lock().await;
        let length = data.size.load(Ordering::Acquire);
        if offset >= length {
            return Ok(Bytes::new());
        }
        let mut end = (offset + size as u64).min(length);
        let stored_end = end.min(content.remote_limit);
        self.metrics
            .cache_read(offset >= stored_end || content.present.contains(offset..stored_end));
        let arriving = self
            .fetch_ahead(&key, &data, &mut content, offset..end, window)
            .await;
        if !arriving.is_empty() {
            drop(content);
            for mut done in arriving {
                // An error only says the task ended, whatever it brought.
                let _ = done.changed().await;
            }
            content = data.content.lock().await;
            // Cut meanwhile?
            end = end.min(data.size.load(Ordering::Acquire));
            if offset >= end {
                return Ok(Bytes::new());
            }
        }
        // What the background did not bring (it failed, or the disk is full) is fetched here.
        if let Err(err) = self.fetch(&key, &mut content, offset..end).await {
            drop(content);
            if err.errno() == libc::ENOSPC {
                // The cache disk is full: make room, or read around the cache.
                self.make_room(end - offset, Duration::ZERO).await?;
                content = data.content.lock().await;
                match self.fetch(&key, &mut content, offset..end).await {
                    Err(err) if err.errno() == libc::ENOSPC => {
                        let uncached = self.read_uncached(&key, &content, offset..end).await;
                        return uncached.unwrap_or(Err(err));
                    }
                    other => other?,
                }
            } else if matches!(&err, FsError::Store(e) if e.kind() == ErrorKind::PreconditionFailed)
            {
                // The object changed in the store while this file was open: start over from it.
                self.refresh(ino, &data).await?;
                content = data.content.lock().await;
                self.fetch(&key, &mut content, offset..end).await?;
            } else {
                return Err(err);
            }
        }
        let file = Arc::clone(&content.file);
        drop(content);
        let bytes = match read_if_in_memory(&file, offset..end) {
            Some(bytes) => bytes,
            None => blocking(move || read_at(&file, offset..end)).await?,
        };
        Ok(Bytes::from(bytes))
    }

    /// `range` of a clean file read from the store without caching it (the cache disk is full
    /// of changes not yet uploaded); `None` when the file has changes of its own.
    async fn read_uncached(
        &self,
        key: &str,
        content: &Content,
        range: Range<u64>,
    ) -> Option<FsResult<Bytes>> {
        if content.dirty || range.end > content.remote_limit {
            return None;
        }
        let options = GetOptions {
            range: Some(range),
            if_match: content.etag.clone(),
        };
        let got = self.store.get(&self.fetch_key(key), options).await;
        Some(got.map(|got| got.body).map_err(FsError::from))
    }

    /// Drops cached contents of a clean file and takes the store's current version.
    async fn refresh(&self, ino: u64, data: &FileData) -> FsResult<()> {
        let key = self.key_of(ino)?;
        let info = self.store.head(&self.fetch_key(&key)).await?;
        let mut content = data.content.lock().await;
        if content.dirty {
            return Ok(());
        }
        content.present = RangeSet::default();
        content.etag = Some(info.etag.clone());
        content.remote_limit = info.size;
        data.size.store(info.size, Ordering::Release);
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.size = info.size;
            inode.remote = Some(Remote {
                etag: info.etag,
                size: info.size,
            });
        }
        Ok(())
    }

    pub async fn write(&self, fh: u64, offset: u64, bytes: &[u8]) -> FsResult<u32> {
        self.write_owned(fh, offset, bytes.to_vec()).await
    }

    /// [`Self::write`] of bytes the caller hands over (FUSE's, copied once out of its buffer).
    pub async fn write_owned(&self, fh: u64, offset: u64, bytes: Vec<u8>) -> FsResult<u32> {
        self.writable()?;
        let ino = self.handle_ino(fh)?;
        self.wait_for_room().await;
        let data = self.file_data(ino).await?;
        let (cache, wanted) = (self.cache.clone(), bytes.len() as u64);
        if !blocking(move || Ok(cache.room_for(wanted))).await?
            && !self.make_room(wanted, ROOM_WAIT).await?
        {
            // Full of changes the store has not taken, but for the margin the change log needs
            // to record deletes that free space.
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        let mut content = data.content.lock().await;
        let size = data.size.load(Ordering::Acquire);
        self.make_dirty(ino, &mut content, size).await?;
        let (file, len) = (Arc::clone(&content.file), bytes.len() as u64);
        blocking(move || Ok(file.write_all_at(&bytes, offset)?)).await?;
        let new_size = size.max(offset + len);
        match content.partial() {
            Some(_) if content.changed.contains(offset..offset + len) => {}
            Some(mut partial) => {
                // Recorded before the write returns: after a crash, the upload must know these
                // bytes are the file's own, not the base version's.
                content.present.insert(offset..offset + len);
                content.changed.insert(offset..offset + len);
                partial.changed = content.changed.clone();
                let (cache, name) = (self.cache.clone(), content.cache_name.clone());
                blocking(move || cache.record_partial(&name, &partial)).await?;
            }
            None => content.present.insert(0..new_size),
        }
        data.size.store(new_size, Ordering::Release);
        drop(content);
        if let Some(inode) = self.ns().get_mut(ino) {
            let now = SystemTime::now();
            inode.attrs.mtime = now;
            inode.ctime = now;
            inode.size = new_size;
        }
        Ok(len as u32)
    }

    async fn truncate(&self, ino: u64, new_size: u64) -> FsResult<()> {
        let data = self.file_data(ino).await?;
        let mut content = Self::lock_for_change(&data, true).await;
        let size = data.size.load(Ordering::Acquire);
        // Only the bytes that survive need fetching.
        content.remote_limit = content.remote_limit.min(new_size);
        self.make_dirty(ino, &mut content, new_size.min(size))
            .await?;
        let file = Arc::clone(&content.file);
        blocking(move || Ok(file.set_len(new_size)?)).await?;
        let (cache, name) = (self.cache.clone(), content.cache_name.clone());
        match content.partial() {
            Some(mut partial) => {
                content.present.truncate(new_size);
                content.changed.truncate(new_size);
                partial.changed = content.changed.clone();
                blocking(move || cache.record_partial(&name, &partial)).await?;
            }
            None => {
                // Cut to nothing of its base version: no longer partial, if it was.
                content.present = RangeSet::full(new_size);
                blocking(move || cache.forget_partial(&name)).await?;
            }
        }
        data.size.store(new_size, Ordering::Release);
        drop(content);
        if let Some(inode) = self.ns().get_mut(ino) {
            let now = SystemTime::now();
            inode.attrs.mtime = now;
            inode.ctime = now;
            inode.size = new_size;
        }
        Ok(())
    }

    /// Records a changed file's contents in the change log (unless already recorded), due after
    /// the write-back delay or now. Returns the change's sequence number, if one is pending.
    async fn queue_upload(&self, data: &FileData, delayed: bool) -> FsResult<Option<u64>> {
        let mut content = data.content.lock().await;
        let _naming = self.naming.read().await;
        let (key, attrs, in_store) = {
            let ns = self.ns();
            if !ns.attached(data.ino) {
                return Ok(None); // Unlinked: nothing to upload.
            }
            let inode = ns.get(data.ino).ok_or(FsError::NotFound)?;
            (
                ns.key(data.ino).ok_or(FsError::NotFound)?,
                inode.attrs,
                inode.remote.is_some(),
            )
        };
        let recorded = content.queued_generation == content.generation
            && self.journal().latest(&key).is_some();
        if !content.dirty || recorded {
            if delayed {
                return Ok(self.journal().latest(&key).map(|e| e.seq));
            }
            let hurried = key.clone();
            return self.log(move |j| j.hurry(&hurried)).await;
        }
        let change = Change::PutFile {
            cache_file: content.cache_name.clone(),
            attrs: attrs.into(),
        };
        let seq = self.record(&key, change, in_store, delayed).await?;
        content.queued_generation = content.generation;
        content.dirty_since = None;
        Ok(seq)
    }

    /// Close: the file's upload is scheduled after the write-back delay.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        let Some(data) = self.ns().get(ino).and_then(|i| i.file.clone()) else {
            return Ok(());
        };
        self.note_direct_writes(&data, Look::Compare).await?;
        self.queue_upload(&data, true).await?;
        Ok(())
    }

    /// fsync: returns once the file (and every change before it) is in the store, or with
    /// `fsync_local`, once it is on local disk.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        let Some(data) = self.ns().get(ino).and_then(|i| i.file.clone()) else {
            return Ok(());
        };
        self.note_direct_writes(&data, Look::Changed).await?;
        if self.config.fsync_local {
            self.queue_upload(&data, true).await?;
            let file = Arc::clone(&data.content.lock().await.file);
            blocking(move || Ok(file.sync_all()?)).await?;
            return self.log(|j| j.sync()).await;
        }
        match self.queue_upload(&data, false).await? {
            Some(seq) => {
                // Changes made before it wait for the fsync too: none waits out its delay.
                self.log(move |j| j.hurry_up_to(seq)).await?;
                self.wait_applied(seq).await
            }
            None => Ok(()),
        }
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let (ino, route) = self.handle_route(fh)?;
        self.handles().remove(&fh);
        let data = self.ns().get(ino).and_then(|i| i.file.clone());
        if let Some(data) = data {
            let noted = match route {
                Route::DirectWrites => self.note_direct_writes(&data, Look::Release).await,
                _ => Ok(()),
            };
            let queued = self.queue_upload(&data, true).await;
            self.count_closed(&data, route).await;
            let last = data.opens.fetch_sub(1, Ordering::AcqRel) == 1;
            if last {
                self.drop_if_clean(&data).await;
            }
            noted?;
            queued?;
        }
        Ok(())
    }

    /// Frees a file's in-memory state once no one has it open and it is in the store.
    async fn drop_if_clean(&self, data: &Arc<FileData>) {
        let clean = !data.content.lock().await.dirty;
        if !clean || data.opens.load(Ordering::Acquire) > 0 {
            return;
        }
        let mut ns = self.ns();
        if let Some(inode) = ns.get_mut(data.ino)
            && inode.file.as_ref().is_some_and(|f| Arc::ptr_eq(f, data))
        {
            inode.size = data.size.load(Ordering::Acquire);
            inode.file = None;
        }
    }

    /// Deletes a file's cache file once nothing needs it (unlinked, not open, not pending).
    async fn drop_cache_file_if_unused(&self, data: &Arc<FileData>) {
        let name = data.content.lock().await.cache_name.clone();
        if !self.uploads_cache_file(&name) {
            self.cache.discard_file(&name);
            self.files.lock().await.remove(&name);
        }
    }

    /// Whether a pending change will upload cache file `name`.
    fn uploads_cache_file(&self, name: &str) -> bool {
        self.journal().uploads_cache_file(name)
    }

    /// Cache files that pending changes will upload.
    fn referenced_cache_files(&self) -> std::collections::HashSet<String> {
        self.journal()
            .entries()
            .filter_map(|e| match &e.change {
                Change::PutFile { cache_file, .. } => Some(cache_file.clone()),
                _ => None,
            })
            .collect()
    }

    /// Removes cache files that neither the index nor a pending change names (left by a crash).
    fn remove_orphaned_cache_files(&self) -> FsResult<()> {
        let mut known = self.referenced_cache_files();
        known.extend(self.cache.indexed_files()?);
        for name in self.cache.all_files()? {
            if !known.contains(&name) {
                self.cache.discard_file(&name);
            }
        }
        Ok(())
    }

    /// Hard links cannot be stored as objects.
    pub fn link(&self) -> FsResult<Attr> {
        Err(FsError::NotSupported("hard links"))
    }

    /// Regular files may be made with mknod; device files, FIFOs and sockets cannot be stored.
    pub async fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        if mode & crate::attrs::S_IFMT != S_IFREG {
            return Err(FsError::NotSupported(
                "special files (devices, FIFOs, sockets)",
            ));
        }
        let (attr, opened) = self
            .create(
                parent,
                name,
                mode,
                umask,
                libc::O_EXCL | libc::O_WRONLY,
                uid,
                gid,
            )
            .await?;
        self.release(opened.fh).await?;
        Ok(attr)
    }
}

/// What `statfs` shows: a volume with room to spare (the store has no fixed size).
#[derive(Debug, Clone, Copy)]
pub struct Statfs {
    pub blocks: u64,
    pub free: u64,
    pub files: u64,
    pub free_files: u64,
    pub block_size: u32,
    pub name_max: u32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store};

    /// A name another host made shows up once the TTL has passed, even right after a lookup of
    /// another name listed the directory again (that listing installs only the name asked for).
    #[tokio::test]
    async fn a_name_made_elsewhere_is_found_after_a_relist_for_another_name() {
        let store = Arc::new(MemoryStore::new());
        let put = |key: &'static str| {
            let store = store.clone();
            async move {
                store
                    .put(key, Bytes::from_static(b"x"), PutOptions::default())
                    .await
                    .unwrap()
            }
        };
        put("d/a").await;
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            metadata_ttl: Duration::from_millis(200),
            ..FsConfig::default()
        };
        let fs = Filesystem::new(
            store.clone(),
            Cache::open(cache_dir.path()).unwrap(),
            config,
        )
        .unwrap();
        let dir = fs.lookup(ROOT, "d".as_ref()).await.unwrap();
        let fh = fs.opendir(dir.ino).await.unwrap();
        assert_eq!(fs.readdir(fh, 0).await.unwrap().len(), 3); // ., .. and a
        put("d/b").await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        assert!(matches!(
            fs.lookup(dir.ino, "c".as_ref()).await,
            Err(FsError::NotFound)
        ));
        let found = fs.lookup(dir.ino, "b".as_ref()).await;
        assert!(found.is_ok(), "d/b is in the store: {found:?}");

        // A listing is reused for the TTL only: after it, a new name shows.
        let fh = fs.opendir(dir.ino).await.unwrap();
        assert_eq!(fs.readdir(fh, 0).await.unwrap().len(), 4);
        put("d/c").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fh = fs.opendir(dir.ino).await.unwrap();
        let names: Vec<String> = fs
            .readdir(fh, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, [".", "..", "a", "b", "c"]);
    }

    /// The names of directory `ino`, as a read of it shows them.
    async fn names_in(fs: &Filesystem, ino: u64) -> Vec<String> {
        let fh = fs.opendir(ino).await.unwrap();
        let entries = fs.readdir(fh, 0).await.unwrap();
        fs.releasedir(fh);
        entries.into_iter().skip(2).map(|e| e.name).collect()
    }

    /// Reading a small tree (an `ls -R`, an `rm -rf`) lists the store once: the directories
    /// inside are answered from that listing within the TTL. A directory made inside after the
    /// listing shows, even once its marker is in the store (and so out of the change log).
    #[tokio::test]
    async fn a_small_tree_is_listed_once() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        for key in ["t/a/x", "t/a/y", "t/b/z", "t/b/c/w", "t/top"] {
            let body = Bytes::from_static(b"x");
            memory.put(key, body, PutOptions::default()).await.unwrap();
        }
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let config = FsConfig {
            metadata_ttl: Duration::from_secs(60),
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config);
        fs.start_uploader();
        let tree = fs.lookup(ROOT, "t".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, tree).await, ["a", "b", "top"]);
        let lists = faulty.calls(Op::List);
        let (a, b) = (
            fs.lookup(tree, "a".as_ref()).await.unwrap().ino,
            fs.lookup(tree, "b".as_ref()).await.unwrap().ino,
        );
        assert_eq!(names_in(&fs, b).await, ["c", "z"]);
        let c = fs.lookup(b, "c".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, c).await, ["w"]);
        assert_eq!(
            faulty.calls(Op::List),
            lists,
            "inner directories listed again"
        );

        fs.mkdir(a, "new".as_ref(), 0o755, 0o022, 0, 0)
            .await
            .unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert!(
            memory.head("t/a/new/").await.is_ok(),
            "the marker is in the store"
        );
        assert_eq!(names_in(&fs, a).await, ["new", "x", "y"]);
    }

    /// A listing slower than the TTL still confirms the names it shows (as of its end): an
    /// `ls -l` of a big directory on a slow store does not ask about each name again.
    #[tokio::test]
    async fn a_listing_slower_than_the_ttl_confirms_what_it_shows() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        for n in 0..5 {
            let body = Bytes::from_static(b"x");
            memory
                .put(&format!("d/f{n}"), body, PutOptions::default())
                .await
                .unwrap();
        }
        let faulty = Arc::new(FaultyStore::new(memory));
        let ttl = Duration::from_millis(300);
        let config = FsConfig {
            metadata_ttl: ttl,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config);
        let dir = fs.lookup(ROOT, "d".as_ref()).await.unwrap().ino;
        assert_eq!(names_in(&fs, dir).await.len(), 5);
        faulty.add_latency(Some(Op::List), ttl * 2);
        tokio::time::sleep(ttl).await;
        let heads = faulty.calls(Op::Head);
        assert_eq!(names_in(&fs, dir).await.len(), 5);
        assert_eq!(faulty.calls(Op::Head), heads, "names asked about again");
    }

    /// A read is answered on the spot only once the cache file holds what it asks for (and all
    /// the stored bytes after it): before, it goes the long way, which fetches.
    #[tokio::test]
    async fn a_read_is_answered_at_once_only_from_the_cache_file() {
        let memory = Arc::new(MemoryStore::new());
        let bytes: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let body = Bytes::from(bytes.clone());
        memory
            .put("big", body, PutOptions::default())
            .await
            .unwrap();
        let (fs, _cache) = test_mount(memory, FsConfig::default());
        let ino = fs.lookup(ROOT, "big".as_ref()).await.unwrap().ino;
        let fh = fs.open(ino, libc::O_RDONLY).await.unwrap().fh;
        let tail = fs.read(fh, 7 << 20, 4096).await.unwrap();
        assert_eq!(&tail[..], &bytes[7 << 20..(7 << 20) + 4096]);
        // The cache file now reaches past offset 0, a hole there.
        assert!(
            fs.read_at_once(fh, 0, 4096).is_none(),
            "the start is not cached"
        );
        let mut at = 0;
        while at < bytes.len() {
            at += fs.read(fh, at as u64, 128 << 10).await.unwrap().len();
        }
        for offset in [0, 4 << 20, (8 << 20) - 100] {
            let read = fs.read_at_once(fh, offset as u64, 4096).expect("cached");
            let end = (offset + 4096).min(bytes.len());
            assert_eq!(&read[..], &bytes[offset..end]);
        }
    }

    /// Bytes the page cache holds are read on the spot; a read past the end, or a large one,
    /// goes to a blocking thread.
    #[test]
    fn data_in_memory_is_read_without_a_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cached");
        let bytes: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(
            read_if_in_memory(&file, 100..4196).as_deref(),
            Some(&bytes[100..4196])
        );
        assert_eq!(read_if_in_memory(&file, (60 << 10)..(68 << 10)), None);
        let large = std::fs::File::create(dir.path().join("large")).unwrap();
        large.set_len(1 << 20).unwrap();
        assert_eq!(read_if_in_memory(&large, 0..(256 << 10)), None);
    }

    /// A renamed file's bytes are fetched from its pending copy's source; when the copy lands
    /// and the source is deleted while that request is on its way, the bytes are fetched under
    /// the file's own name (an append in the stress test failed with ENOENT). The race is played
    /// here by putting the store in the state the copy and the delete leave while the request
    /// waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_racing_the_copy_of_a_renamed_file_finds_its_bytes() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let put = |key: &'static str| {
            let memory = memory.clone();
            async move {
                memory
                    .put(key, Bytes::from_static(b"contents"), PutOptions::default())
                    .await
                    .unwrap();
            }
        };
        put("source").await;
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(faulty.clone(), config);
        fs.start_uploader();
        fs.lookup(ROOT, "source".as_ref()).await.unwrap();
        fs.allow_uploads_until(Instant::now());
        fs.rename(ROOT, "source".as_ref(), ROOT, "target".as_ref(), false)
            .await
            .unwrap();
        let attr = fs.lookup(ROOT, "target".as_ref()).await.unwrap();

        faulty.add_latency(Some(Op::Get), Duration::from_millis(500));
        let appending = {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move {
                let opened = fs.open(attr.ino, libc::O_WRONLY).await?;
                fs.write(opened.fh, 8, b"!").await?;
                fs.release(opened.fh).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // What the copy and the delete of its source leave, then the uploader catching up.
        put("target").await;
        memory.delete("source").await.unwrap();
        fs.allow_uploads_until(Instant::now() + Duration::from_secs(60));
        appending.await.unwrap().unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        assert_eq!(&memory.get_all("target").await.unwrap().1[..], b"contents!");
    }

    /// Creates `name`, writes it and closes it (FLUSH); its RELEASE comes a little later, in a
    /// task of its own, as the kernel sends it.
    async fn closed_then_released_later(
        fs: &Arc<Filesystem>,
        name: &str,
        round: usize,
    ) -> tokio::task::JoinHandle<()> {
        let (_, opened) = fs
            .create(ROOT, name.as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, b"contents").await.unwrap();
        fs.flush(opened.fh).await.unwrap();
        let fs = Arc::clone(fs);
        tokio::spawn(async move {
            for _ in 0..round % 40 {
                tokio::task::yield_now().await;
            }
            fs.release(opened.fh).await.unwrap();
        })
    }

    /// The kernel sends a file's RELEASE after close() has returned, so it may arrive while the
    /// next call removes the file: the release must not put the file's contents back in the
    /// change log under the name just removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_release_racing_an_unlink_does_not_bring_the_file_back() {
        let (fs, _cache) = test_mount(Arc::new(MemoryStore::new()), FsConfig::default());
        for round in 0..400 {
            let name = format!("f{round}");
            let releasing = closed_then_released_later(&fs, &name, round).await;
            fs.unlink(ROOT, name.as_ref()).await.unwrap();
            releasing.await.unwrap();
            let pending = fs.journal().latest(&name).map(|e| e.change.clone());
            assert!(
                pending.is_none(),
                "round {round}: {name} was removed, yet the change log holds {pending:?}"
            );
        }
    }

    /// The same race with a rename onto a name the store holds: the release must not record the
    /// contents under the new name as if the store had nothing there, or deleting that name
    /// later would leave the store's old object in place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_release_racing_a_rename_keeps_the_replaced_object_known() {
        let store = Arc::new(MemoryStore::new());
        let (fs, _cache) = test_mount(store.clone(), FsConfig::default());
        for round in 0..400 {
            let (source, target) = (format!("s{round}"), format!("t{round}"));
            store
                .put(&target, Bytes::from_static(b"old"), PutOptions::default())
                .await
                .unwrap();
            let releasing = closed_then_released_later(&fs, &source, round).await;
            fs.rename(ROOT, source.as_ref(), ROOT, target.as_ref(), false)
                .await
                .unwrap();
            releasing.await.unwrap();
            fs.unlink(ROOT, target.as_ref()).await.unwrap();
            let pending = fs.journal().latest(&target).map(|e| e.change.clone());
            assert_eq!(
                pending,
                Some(Change::Delete),
                "round {round}: the store's {target} would stay"
            );
        }
    }
}
