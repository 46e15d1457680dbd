//! The filesystem logic: POSIX operations over a store prefix, with a local read cache. Async,
//! FUSE-free, and returning plain results, so that it is tested directly (the property test
//! drives it against a model) and the FUSE adapter stays thin.
//!
//! Mapping (docs/SEMANTICS.md has the full contract): a file or symlink is one object whose key
//! is its path; a directory is a key prefix plus a `dir/` marker object; attributes travel as
//! s3fs-style metadata. Namespace changes go to the store at once. A file's contents are cached
//! in a local cache file; writes change the cache file, and the whole file is uploaded when it is
//! flushed, fsynced or closed (or truncated while not open), under the file's lock, so the store
//! only ever holds versions the file really had.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use crate::attrs::{Attrs, Defaults, Kind, S_IFDIR, S_IFREG};
use crate::cache::{Cache, RangeSet};
use crate::error::{FsError, FsResult};
use crate::namespace::{Inode, Namespace, ROOT, Remote};
use crate::store::{
    ETag, ErrorKind, GetOptions, ListOptions, MAX_KEY_LEN, ObjectInfo, PutCondition, PutOptions,
    SharedStore, StoreExt,
};

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
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            defaults: Defaults::default(),
            metadata_ttl: Duration::from_secs(2),
            read_only: false,
            block_size: 1 << 20,
            max_readahead: 32 << 20,
            single_put_limit: 16 << 20,
            part_size: 8 << 20,
            concurrency: 8,
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
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep its page cache of the file: it has not changed since last opened.
    pub keep_cache: bool,
}

/// The contents of one file while it is open or changed: a cache file and what it holds.
#[derive(Debug)]
pub struct FileData {
    content: tokio::sync::Mutex<Content>,
    size: AtomicU64,
    opens: AtomicUsize,
}

#[derive(Debug)]
struct Content {
    cache_name: String,
    file: Arc<File>,
    /// Valid bytes of the cache file (when dirty, all of `0..size`).
    present: RangeSet,
    /// The store version the clean bytes are from.
    etag: Option<ETag>,
    /// Bytes at or past this offset never come from the store (truncated, or written past).
    remote_limit: u64,
    /// Changed locally and not yet uploaded.
    dirty: bool,
    /// The version the kernel's page cache holds, from the last open.
    kernel_cached: Option<ETag>,
}

#[derive(Debug)]
enum Handle {
    File {
        ino: u64,
        /// Where the next sequential read would start, and the current read-ahead window.
        next_offset: u64,
        window: u64,
    },
    Dir {
        entries: Arc<Vec<DirEntry>>,
    },
}

/// What a probe of the store found at a name.
enum Found {
    Object(ObjectInfo),
    Dir(Option<ObjectInfo>),
}

/// The filesystem over one store prefix.
#[derive(Debug)]
pub struct Filesystem {
    store: SharedStore,
    cache: Cache,
    config: FsConfig,
    ns: Mutex<Namespace>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

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

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> FsResult<T> + Send + 'static,
) -> FsResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FsError::Io(std::io::Error::other(format!("blocking task failed: {e}"))))?
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

impl Filesystem {
    pub fn new(store: SharedStore, cache: Cache, config: FsConfig) -> Self {
        let root_attrs = Attrs {
            mode: S_IFDIR | config.defaults.dir_mode,
            uid: config.defaults.uid,
            gid: config.defaults.gid,
            mtime: SystemTime::now(),
        };
        Self {
            store,
            cache,
            config,
            ns: Mutex::new(Namespace::new(root_attrs)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    fn ns(&self) -> MutexGuard<'_, Namespace> {
        self.ns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> FsResult<()> {
        if self.config.read_only {
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
    async fn probe(&self, key: &str) -> FsResult<Option<Found>> {
        let marker = format!("{key}/");
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
                inode.checked = std::time::Instant::now();
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

    /// Finds `name` in `parent`, asking the store when what the mount knows is stale.
    async fn resolve(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        let key = {
            let ns = self.ns();
            let key = Self::child_key(&ns, parent, name)?;
            if let Some(ino) = ns.child(parent, name) {
                if self.trusted(ns.get(ino).expect("live child")) {
                    return Ok(Some(ino));
                }
            } else if ns.known_absent(parent, name, self.config.metadata_ttl) {
                return Ok(None);
            }
            key
        };
        let found = self.probe(&key).await?;
        let mut ns = self.ns();
        match found {
            Some(found) => Ok(Some(self.install(&mut ns, parent, name, found))),
            None => {
                if let Some(ino) = ns.child(parent, name) {
                    if ns.get(ino).is_some_and(|i| i.file.is_some()) {
                        return Ok(Some(ino));
                    }
                    ns.detach(ino);
                }
                ns.mark_absent(parent, name);
                Ok(None)
            }
        }
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
        let ino = self.existing(parent, &name).await?;
        self.count_lookup(ino);
        self.attr(ino)
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.ns().forget(ino, count);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
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
            self.persist_attrs(ino, kind).await?;
        }
        self.attr(ino)
    }

    /// Brings the store up to date with an inode's attributes (and a file's changed contents,
    /// when no one has it open to upload it at close).
    async fn persist_attrs(&self, ino: u64, kind: Kind) -> FsResult<()> {
        let (key, attrs, data) = {
            let ns = self.ns();
            if !ns.attached(ino) {
                return Ok(());
            }
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            (
                ns.key(ino).unwrap_or_default(),
                inode.attrs,
                inode.file.clone(),
            )
        };
        if ino == ROOT {
            return Ok(()); // The root has no object of its own.
        }
        if let Some(data) = data {
            let dirty = data.content.lock().await.dirty;
            if dirty {
                return if data.opens.load(Ordering::Acquire) == 0 {
                    self.upload(ino).await
                } else {
                    Ok(()) // Uploaded, with the new attributes, at flush or close.
                };
            }
        }
        let remote = match kind {
            Kind::Dir => {
                let marker = format!("{key}/");
                let options = PutOptions::with_metadata(attrs.encode());
                self.store.put(&marker, Bytes::new(), options).await?
            }
            Kind::File | Kind::Symlink => self.store.copy(&key, &key, Some(attrs.encode())).await?,
        };
        if let Some(inode) = self.ns().get_mut(ino) {
            let size = inode.size;
            inode.remote = Some(Remote {
                etag: remote.etag,
                size,
            });
        }
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
        let (_, body) = self.store.get_all(&key).await?;
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
        let name = check_name(name)?;
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Dir, mode, umask, uid, gid);
        let marker = format!("{key}/");
        let put = self
            .store
            .put(
                &marker,
                Bytes::new(),
                PutOptions::with_metadata(attrs.encode()),
            )
            .await?;
        let remote = Remote {
            etag: put.etag,
            size: 0,
        };
        let ino = self.ns().upsert(parent, &name, attrs, 0, Some(remote));
        self.count_lookup(ino);
        self.attr(ino)
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
        let name = check_name(name)?;
        let target = std::str::from_utf8(target.as_bytes())
            .map_err(|_| FsError::Invalid("link targets must be valid UTF-8".into()))?
            .to_string();
        let key = self.vacant(parent, &name).await?;
        let attrs = Self::new_attrs(Kind::Symlink, 0o777, 0, uid, gid);
        let body = Bytes::from(target.clone().into_bytes());
        let put = self
            .store
            .put(&key, body, PutOptions::with_metadata(attrs.encode()))
            .await?;
        let size = target.len() as u64;
        let ino = self.ns().upsert(
            parent,
            &name,
            attrs,
            size,
            Some(Remote {
                etag: put.etag,
                size,
            }),
        );
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
        let (key, data) = {
            let ns = self.ns();
            let inode = ns.get(ino).ok_or(FsError::NotFound)?;
            if inode.kind() == Kind::Dir {
                return Err(FsError::IsDir);
            }
            (ns.key(ino).ok_or(FsError::NotFound)?, inode.file.clone())
        };
        if let Some(data) = &data {
            // Still open somewhere: keep every byte locally before the object goes.
            let mut content = data.content.lock().await;
            let size = data.size.load(Ordering::Acquire);
            self.materialize(&key, &mut content, size).await?;
            content.dirty = false;
            content.remote_limit = 0;
        }
        self.store.delete(&key).await?;
        self.ns().detach(ino);
        let cache = self.cache.clone();
        let keep_file = data.is_some();
        blocking(move || {
            if keep_file {
                cache.forget(&key)
            } else {
                cache.remove(&key)
            }
        })
        .await
    }

    /// Fails with ENOTEMPTY if the directory at `key` holds anything but its marker.
    async fn ensure_empty(&self, key: &str) -> FsResult<()> {
        let prefix = format!("{key}/");
        let two = ListOptions {
            delimited: false,
            continuation: None,
            max_keys: Some(2),
        };
        let listed = self.store.list(&prefix, two).await?;
        if listed.objects.iter().any(|o| o.key != prefix) {
            return Err(FsError::NotEmpty);
        }
        Ok(())
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.writable()?;
        let name = check_name(name)?;
        let ino = self.existing(parent, &name).await?;
        let key = {
            let ns = self.ns();
            if ns.get(ino).ok_or(FsError::NotFound)?.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            ns.key(ino).ok_or(FsError::NotFound)?
        };
        self.ensure_empty(&key).await?;
        self.store.delete(&format!("{key}/")).await?;
        self.ns().detach(ino);
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
        let (name, new_name) = (check_name(name)?, check_name(new_name)?);
        let source = self.existing(parent, &name).await?;
        let target = self.resolve(new_parent, &new_name).await?;
        if target == Some(source) {
            return Ok(());
        }
        let (source_kind, source_key, target_key, data) = {
            let ns = self.ns();
            let inode = ns.get(source).ok_or(FsError::NotFound)?;
            let target_key = Self::child_key(&ns, new_parent, &new_name)?;
            (
                inode.kind(),
                ns.key(source).ok_or(FsError::NotFound)?,
                target_key,
                inode.file.clone(),
            )
        };
        if let Some(target) = target {
            if no_replace {
                return Err(FsError::Exists);
            }
            let target_kind = self.attr(target)?.kind;
            match (source_kind, target_kind) {
                (Kind::Dir, Kind::Dir) => self.ensure_empty(&target_key).await?,
                (Kind::Dir, _) => return Err(FsError::NotDir),
                (_, Kind::Dir) => return Err(FsError::IsDir),
                _ => {}
            }
        }
        if source_kind == Kind::Dir {
            if target_key.starts_with(&format!("{source_key}/")) {
                return Err(FsError::Invalid(
                    "cannot move a directory into itself".into(),
                ));
            }
            self.rename_dir(&source_key, &target_key).await?;
            self.ns().move_to(source, new_parent, &new_name);
            let cache = self.cache.clone();
            let (from, to) = (format!("{source_key}/"), format!("{target_key}/"));
            blocking(move || cache.rename(&from, &to, true)).await?;
        } else {
            // Hold the file's contents still while its object moves.
            let _held = match &data {
                Some(data) => Some(data.content.lock().await),
                None => None,
            };
            self.store.copy(&source_key, &target_key, None).await?;
            self.store.delete(&source_key).await?;
            self.ns().move_to(source, new_parent, &new_name);
            let cache = self.cache.clone();
            blocking(move || cache.rename(&source_key, &target_key, false)).await?;
        }
        Ok(())
    }

    /// Copies every object under `from/` to `to/`, then deletes the originals. Not atomic: a
    /// reader elsewhere may see both trees, or part of the new one, while it runs.
    async fn rename_dir(&self, from: &str, to: &str) -> FsResult<()> {
        let (from, to) = (format!("{from}/"), format!("{to}/"));
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
        Ok(())
    }

    // ----- directories -----

    /// Lists a directory once, at open; reads of the handle page through that listing.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let prefix = {
            let ns = self.ns();
            if ns.get(ino).ok_or(FsError::NotFound)?.kind() != Kind::Dir {
                return Err(FsError::NotDir);
            }
            ns.dir_prefix(ino).ok_or(FsError::NotFound)?
        };
        let listed = self.store.list_all(&prefix, true).await?;
        let mut names: HashMap<String, Kind> = HashMap::new();
        for prefix_entry in &listed.prefixes {
            let name = prefix_entry[prefix.len()..].trim_end_matches('/');
            if check_name(OsStr::new(name)).is_ok() {
                names.insert(name.to_string(), Kind::Dir);
            }
        }
        for object in &listed.objects {
            let name = &object.key[prefix.len()..];
            if check_name(OsStr::new(name)).is_ok() {
                // A name that is both a file and a directory shows as the directory.
                names.entry(name.to_string()).or_insert(Kind::File);
            }
        }
        // Names this mount holds open or changed stay, whatever the listing says.
        let busy: Vec<String> = {
            let ns = self.ns();
            ns.children(ino)
                .filter(|(_, child)| ns.get(*child).is_some_and(|c| c.file.is_some()))
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in busy {
            names.entry(name).or_insert(Kind::File);
        }
        let mut entries: Vec<DirEntry> = stream::iter(names)
            .map(|(name, _)| async move {
                match self.resolve(ino, &name).await {
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
        // Forget children that are no longer there.
        {
            let mut ns = self.ns();
            let listed: std::collections::HashSet<&str> =
                entries.iter().map(|e| e.name.as_str()).collect();
            let gone: Vec<u64> = ns
                .children(ino)
                .filter(|(name, _)| !listed.contains(name.as_str()))
                .map(|(_, child)| child)
                .collect();
            for child in gone {
                ns.detach(child);
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
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(
            fh,
            Handle::Dir {
                entries: Arc::new(all),
            },
        );
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on (offsets count entries, "." and ".." first).
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        match self.handles().get(&fh) {
            Some(Handle::Dir { entries }) => {
                Ok(entries.iter().skip(offset as usize).cloned().collect())
            }
            _ => Err(FsError::BadHandle),
        }
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

    /// The open state of a file's contents, set up from the cache index on first use.
    async fn file_data(&self, ino: u64) -> FsResult<Arc<FileData>> {
        let (key, remote, size) = {
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
            (
                ns.key(ino).unwrap_or_default(),
                inode.remote.clone(),
                inode.size,
            )
        };
        let cache = self.cache.clone();
        let remote_etag = remote.as_ref().map(|r| r.etag.clone());
        let (cache_name, file, present) = blocking(move || match cache.lookup(&key)? {
            Some(cached) if Some(&cached.etag) == remote_etag.as_ref() => {
                let file = cache.open_file(&cached.file)?;
                let mut present = cached.present;
                present.truncate(size);
                Ok((cached.file, file, present))
            }
            stale => {
                if let Some(stale) = stale {
                    cache.forget(&key)?;
                    cache.discard_file(&stale.file);
                }
                let (name, file) = cache.new_file()?;
                Ok((name, file, RangeSet::default()))
            }
        })
        .await?;
        let data = Arc::new(FileData {
            content: tokio::sync::Mutex::new(Content {
                cache_name,
                file: Arc::new(file),
                present,
                etag: remote.as_ref().map(|r| r.etag.clone()),
                remote_limit: remote.as_ref().map_or(0, |r| r.size.min(size)),
                dirty: false,
                kernel_cached: None,
            }),
            size: AtomicU64::new(size),
            opens: AtomicUsize::new(0),
        });
        let mut ns = self.ns();
        let inode = ns.get_mut(ino).ok_or(FsError::NotFound)?;
        Ok(Arc::clone(inode.file.get_or_insert(data)))
    }

    fn new_handle(&self, ino: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle::File {
            ino,
            next_offset: 0,
            window: self.config.block_size,
        };
        self.handles().insert(fh, handle);
        fh
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
        }
        self.getattr(ino).await?; // Close-to-open: see the store's latest version.
        let data = self.file_data(ino).await?;
        data.opens.fetch_add(1, Ordering::AcqRel);
        let keep_cache = {
            let mut content = data.content.lock().await;
            let keep = content.kernel_cached.is_some() && content.kernel_cached == content.etag;
            content.kernel_cached = content.etag.clone();
            keep
        };
        let fh = self.new_handle(ino);
        if flags & libc::O_TRUNC != 0
            && let Err(err) = self.truncate(ino, 0).await
        {
            self.release(fh).await.ok();
            return Err(err);
        }
        Ok(Opened { fh, keep_cache })
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
        let name = check_name(name)?;
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
        let options = PutOptions {
            metadata: attrs.encode(),
            condition: if flags & libc::O_EXCL != 0 {
                PutCondition::IfAbsent
            } else {
                PutCondition::Always
            },
        };
        let put = self
            .store
            .put(&key, Bytes::new(), options)
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::PreconditionFailed {
                    FsError::Exists
                } else {
                    FsError::Store(e)
                }
            })?;
        let remote = Remote {
            etag: put.etag,
            size: 0,
        };
        let ino = self.ns().upsert(parent, &name, attrs, 0, Some(remote));
        self.count_lookup(ino);
        let data = self.file_data(ino).await?;
        data.opens.fetch_add(1, Ordering::AcqRel);
        let fh = self.new_handle(ino);
        Ok((
            self.attr(ino)?,
            Opened {
                fh,
                keep_cache: false,
            },
        ))
    }

    fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        match self.handles().get(&fh) {
            Some(Handle::File { ino, .. }) => Ok(*ino),
            _ => Err(FsError::BadHandle),
        }
    }

    /// The read-ahead window for a read at `offset`, growing while reads are sequential.
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
        *window = if offset == *next_offset && offset > 0 {
            (*window * 2).min(self.config.max_readahead)
        } else {
            self.config.block_size
        };
        *next_offset = offset + size;
        *window
    }

    /// Makes `want` (clipped to what the store holds) present in the cache file, fetching the
    /// missing blocks, plus `window` bytes of read-ahead, with several requests in flight.
    async fn fetch(
        &self,
        key: &str,
        content: &mut Content,
        want: Range<u64>,
        window: u64,
    ) -> FsResult<()> {
        let limit = content.remote_limit;
        if want.start >= limit || content.dirty {
            return Ok(());
        }
        let want_end = want.end.min(limit);
        if content.present.contains(want.start..want_end) {
            return Ok(());
        }
        let block = self.config.block_size;
        let start = want.start / block * block;
        let end = want_end
            .max(want.start + window)
            .div_ceil(block)
            .saturating_mul(block)
            .min(limit);
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
        let etag = content.etag.clone();
        let file = Arc::clone(&content.file);
        let fetched: Vec<Range<u64>> = stream::iter(pieces)
            .map(|piece| {
                let (etag, file) = (etag.clone(), Arc::clone(&file));
                async move {
                    let options = GetOptions {
                        range: Some(piece.clone()),
                        if_match: etag,
                    };
                    let got = self.store.get(key, options).await?;
                    let range = got.range.clone();
                    blocking(move || {
                        file.write_all_at(&got.body, range.start)?;
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
        if let Some(etag) = &content.etag {
            let (cache, key, name, etag, present) = (
                self.cache.clone(),
                key.to_string(),
                content.cache_name.clone(),
                etag.clone(),
                content.present.clone(),
            );
            blocking(move || cache.record(&key, &name, &etag, &present)).await?;
        }
        Ok(())
    }

    /// Fetches every byte below `size` the store still holds, so the cache file is the whole file.
    async fn materialize(&self, key: &str, content: &mut Content, size: u64) -> FsResult<()> {
        self.fetch(key, content, 0..size, 0).await
    }

    /// Marks the contents changed locally: the index stops describing them.
    async fn make_dirty(&self, key: &str, content: &mut Content, size: u64) -> FsResult<()> {
        if !content.dirty {
            self.materialize(key, content, size).await?;
            content.dirty = true;
            content.present = RangeSet::full(size);
            let (cache, key) = (self.cache.clone(), key.to_string());
            blocking(move || cache.forget(&key)).await?;
        }
        Ok(())
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
        let end = (offset + size as u64).min(length);
        if let Err(err) = self.fetch(&key, &mut content, offset..end, window).await {
            if !matches!(&err, FsError::Store(e) if e.kind() == ErrorKind::PreconditionFailed) {
                return Err(err);
            }
            // The object changed in the store while this file was open: start over from it.
            drop(content);
            self.refresh(ino, &data).await?;
            content = data.content.lock().await;
            self.fetch(&key, &mut content, offset..end, window).await?;
        }
        let file = Arc::clone(&content.file);
        drop(content);
        let bytes = blocking(move || read_at(&file, offset..end)).await?;
        Ok(Bytes::from(bytes))
    }

    /// Drops cached contents of a clean file and takes the store's current version.
    async fn refresh(&self, ino: u64, data: &FileData) -> FsResult<()> {
        let key = self.key_of(ino)?;
        let info = self.store.head(&key).await?;
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
        self.writable()?;
        let ino = self.handle_ino(fh)?;
        let data = self.file_data(ino).await?;
        let key = self.key_of(ino).unwrap_or_default();
        let mut content = data.content.lock().await;
        let size = data.size.load(Ordering::Acquire);
        self.make_dirty(&key, &mut content, size).await?;
        let (file, owned, len) = (
            Arc::clone(&content.file),
            bytes.to_vec(),
            bytes.len() as u64,
        );
        blocking(move || Ok(file.write_all_at(&owned, offset)?)).await?;
        let new_size = size.max(offset + len);
        content.present.insert(0..new_size);
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
        let key = self.key_of(ino).unwrap_or_default();
        let mut content = data.content.lock().await;
        let size = data.size.load(Ordering::Acquire);
        if new_size == size && content.dirty {
            return Ok(());
        }
        // Only the bytes that survive need fetching.
        content.remote_limit = content.remote_limit.min(new_size);
        self.make_dirty(&key, &mut content, new_size.min(size))
            .await?;
        let file = Arc::clone(&content.file);
        blocking(move || Ok(file.set_len(new_size)?)).await?;
        content.present = RangeSet::full(new_size);
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

    /// Uploads a changed file as a whole new version, under its lock (writers wait).
    async fn upload(&self, ino: u64) -> FsResult<()> {
        let Some(data) = self.ns().get(ino).and_then(|i| i.file.clone()) else {
            return Ok(());
        };
        let mut content = data.content.lock().await;
        if !content.dirty {
            return Ok(());
        }
        let (key, attrs) = {
            let ns = self.ns();
            if !ns.attached(ino) {
                // Unlinked or replaced: there is nothing left in the store to update.
                content.dirty = false;
                return Ok(());
            }
            (
                ns.key(ino).ok_or(FsError::NotFound)?,
                ns.get(ino).map(|i| i.attrs),
            )
        };
        let attrs = attrs.ok_or(FsError::NotFound)?;
        let size = data.size.load(Ordering::Acquire);
        let file = Arc::clone(&content.file);
        let etag = self.put_file(&key, &file, size, attrs).await?;
        content.dirty = false;
        content.etag = Some(etag.clone());
        content.remote_limit = size;
        content.present = RangeSet::full(size);
        content.kernel_cached = Some(etag.clone());
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.size = size;
            inode.remote = Some(Remote {
                etag: etag.clone(),
                size,
            });
            inode.checked = std::time::Instant::now();
        }
        let (cache, name, present) = (
            self.cache.clone(),
            content.cache_name.clone(),
            content.present.clone(),
        );
        blocking(move || cache.record(&key, &name, &etag, &present)).await
    }

    /// Writes `size` bytes of `file` to `key`: one put, or a multipart upload with parts in
    /// parallel for large files.
    async fn put_file(
        &self,
        key: &str,
        file: &Arc<File>,
        size: u64,
        attrs: Attrs,
    ) -> FsResult<ETag> {
        let metadata = attrs.encode();
        if size <= self.config.single_put_limit {
            let file = Arc::clone(file);
            let body = blocking(move || read_at(&file, 0..size)).await?;
            let put = self
                .store
                .put(key, Bytes::from(body), PutOptions::with_metadata(metadata))
                .await?;
            return Ok(put.etag);
        }
        let part_size = self.config.part_size;
        let upload = self.store.start_multipart(key, metadata).await?;
        let parts =
            stream::iter((0..size.div_ceil(part_size)).map(|i| (i as u32 + 1, i * part_size)))
                .map(|(number, start)| {
                    let (file, upload) = (Arc::clone(file), &upload);
                    async move {
                        let range = start..(start + part_size).min(size);
                        let body = blocking(move || read_at(&file, range)).await?;
                        let part = self
                            .store
                            .upload_part(key, upload, number, Bytes::from(body))
                            .await?;
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

    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        self.upload(ino).await
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        let uploaded = self.upload(ino).await;
        self.handles().remove(&fh);
        let data = self.ns().get(ino).and_then(|i| i.file.clone());
        if let Some(data) = data {
            let last = data.opens.fetch_sub(1, Ordering::AcqRel) == 1;
            let clean = !data.content.lock().await.dirty;
            if last && clean {
                let mut ns = self.ns();
                if let Some(inode) = ns.get_mut(ino)
                    && data.opens.load(Ordering::Acquire) == 0
                {
                    inode.size = data.size.load(Ordering::Acquire);
                    inode.file = None;
                }
                if !ns.attached(ino) {
                    let name = data.content.try_lock().map(|c| c.cache_name.clone()).ok();
                    drop(ns);
                    if let Some(name) = name {
                        self.cache.discard_file(&name);
                    }
                }
            }
        }
        uploaded
    }

    /// Uploads every changed file (before an unmount).
    pub async fn flush_all(&self) -> FsResult<()> {
        let changed: Vec<u64> = {
            let ns = self.ns();
            let mut found = Vec::new();
            let mut stack = vec![ROOT];
            while let Some(at) = stack.pop() {
                for (_, child) in ns.children(at) {
                    stack.push(child);
                    if ns.get(child).is_some_and(|c| c.file.is_some()) {
                        found.push(child);
                    }
                }
            }
            found
        };
        for ino in changed {
            self.upload(ino).await?;
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

    /// Inodes known to the mount (for tests and reports).
    pub fn inode_count(&self) -> usize {
        self.ns().len()
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
