//! Direct routes: the kernel reads and writes a file's cache file itself (FUSE passthrough,
//! Linux 6.9 and later), so open files move at the speed of the local disk instead of going
//! through the mount one request at a time.
//!
//! A handle goes direct when the kernel offers passthrough and the cache file holds the whole
//! file (nothing left to fetch from the store); a writer only when its open creates or
//! truncates the file (`cp`, `tar`, a database's dump: new contents written and closed). The
//! kernel refuses a mix of routes on one file, so while any handle of a file is direct every
//! new one is too, and while any goes through the mount none goes direct.
//!
//! The mount never sees direct writes. It learns of them from the cache file's size and
//! modification time (on `getattr`, `lookup`, each tick, and before an upload), and takes every
//! fsync, and the release of a writer after an upload read the file, as a change. An upload
//! while a direct writer has the file open (its maximum dirty age, an fsync) reads a settled
//! copy: the cache file copied, then compared with the copy, and copied again if a write came
//! meanwhile, so the store never gets a version the file did not have (appends past the copied
//! length do not unsettle it). Two rules keep the store and the cache index right:
//! - a file with direct writers is never marked clean after an upload, and
//! - when a direct writer is released after an upload read the file while it was open, the
//!   file counts as changed again, so the version the last writer left is uploaded.
//!
//! While direct handles are open the cache file stays where the kernel has it: a change (a
//! writer joining direct readers, a truncate) cannot move it to a copy during an upload that
//! reads it, as it otherwise would ([`Filesystem::copy_aside`]); it waits for that upload's
//! read to end instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{FileContents, FileData, Filesystem, blocking};
use crate::cache::copy_cache_file;
use crate::error::{FsError, FsResult};

/// How the kernel reaches a file's bytes through one handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// Not counted yet: being opened.
    Opening,
    /// Read and write requests to this mount.
    Mount,
    /// The kernel reads the cache file itself.
    DirectReads,
    /// The kernel reads and writes the cache file itself.
    DirectWrites,
}

/// A file's open handles by route, and what the mount knows of the kernel's direct writes.
#[derive(Debug, Default)]
pub(super) struct Routes {
    through_mount: usize,
    direct: usize,
    /// Size and modification time of the cache file when last looked at with writers open.
    seen: Option<(u64, SystemTime)>,
    /// An upload read the cache file while a direct writer had it open.
    read_while_written: bool,
}

/// What an open asks for, as far as the route goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenIntent {
    Reads,
    /// Writes to a file it did not create or truncate, or reads it too.
    Writes,
    /// Only writes, to a file it created or truncated.
    WritesAfresh,
}

impl OpenIntent {
    /// The intent of an open with `flags` that writes, of a file it created or truncated
    /// (`afresh`): new contents written out (`cp`, `tar`, a dump) open write-only; a database
    /// making its files (SQLite's `-wal`, say) opens them read-write, writes in place and
    /// fsyncs, and goes through the mount, which then knows what changed (see `durable`).
    pub(super) fn of_writer(flags: i32, afresh: bool) -> Self {
        if afresh && flags & libc::O_ACCMODE == libc::O_WRONLY {
            Self::WritesAfresh
        } else {
            Self::Writes
        }
    }
}

/// How often a change waiting for an upload to stop reading a cache file looks again.
const UPLOAD_READ_POLL: Duration = Duration::from_millis(20);

/// How many times an upload copies a file being written directly before it tries later.
const SETTLE_ATTEMPTS: usize = 4;

/// Whether a look at the cache file takes it as changed regardless of what it shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DirectWriteCheck {
    /// Changed only if its size or modification time moved.
    Compare,
    /// Changed (an fsync: the upload it waits for must read the file after this).
    Changed,
    /// A writer's release: changed if it moved, or if an upload read it while written.
    Release,
}

/// Free bytes the cache disk must have for a writer to go direct: direct writes do not wait
/// for uploads to free room when the disk fills, as writes through the mount do.
const DIRECT_WRITE_HEADROOM: u64 = 1 << 30;

impl Filesystem {
    /// Called once the kernel agreed to passthrough at mount time.
    pub fn allow_passthrough(&self) {
        if self.config.passthrough {
            self.passthrough.store(true, Ordering::Release);
        }
    }

    /// Picks the route of the new handle `fh` of `data` and counts it. Returns the cache file
    /// the kernel is to use when the route is direct.
    pub(super) async fn choose_route(
        &self,
        fh: u64,
        data: &FileData,
        open: OpenIntent,
    ) -> FsResult<Option<Arc<File>>> {
        let mut content = Self::lock_for_change(data, open != OpenIntent::Reads).await;
        let size = data.size.load(Ordering::Acquire);
        let direct = if content.routes().direct > 0 {
            true
        } else if content.routes().through_mount > 0 || !self.passthrough.load(Ordering::Acquire) {
            false
        } else {
            let whole = !content.is_partial() && content.present().contains(0..size);
            whole
                && match open {
                    OpenIntent::Reads => true,
                    OpenIntent::Writes => false,
                    OpenIntent::WritesAfresh => self.room_to_write_directly(),
                }
        };
        let writes = open != OpenIntent::Reads;
        let route = match (direct, writes) {
            (false, _) => Route::Mount,
            (true, false) => Route::DirectReads,
            (true, true) => {
                // Everything that can fail comes before the handle is counted.
                self.make_dirty(data.ino, &mut content, size).await?;
                let meta = content.file().metadata()?;
                let seen = (meta.len(), meta.modified()?);
                if data.direct_writers.fetch_add(1, Ordering::AcqRel) == 0 {
                    content.routes_mut().seen = Some(seen);
                }
                Route::DirectWrites
            }
        };
        self.handles.set_route(fh, route);
        tracing::debug!(
            ino = data.ino,
            fh,
            ?route,
            through_mount = content.routes().through_mount,
            direct = content.routes().direct,
            "route chosen"
        );
        if route == Route::Mount {
            content.routes_mut().through_mount += 1;
            return Ok(None);
        }
        // The kernel's page cache of the file is not kept while it goes direct.
        content.kernel_took_over();
        content.routes_mut().direct += 1;
        self.metrics.direct_open();
        Ok(Some(Arc::clone(content.file())))
    }

    /// The kernel could not take the cache file of direct handle `fh` (no passthrough for this
    /// process, say): the handle goes through the mount, and so does every later open.
    pub async fn route_refused(&self, fh: u64) {
        self.passthrough.store(false, Ordering::Release);
        let Ok((ino, route)) = self.handle_route(fh) else {
            return;
        };
        let Some(data) = self.loaded_file(ino) else {
            return;
        };
        self.count_closed(&data, route).await;
        data.content.lock().await.routes_mut().through_mount += 1;
        self.handles.set_route(fh, Route::Mount);
    }

    /// Uncounts a closed handle of `data`.
    pub(super) async fn count_closed(&self, data: &FileData, route: Route) {
        let mut content = data.content.lock().await;
        Self::count_closed_locked(data, &mut content, route);
    }

    /// [`Self::count_closed`] under the file's lock.
    pub(super) fn count_closed_locked(data: &FileData, content: &mut FileContents, route: Route) {
        tracing::debug!(ino = data.ino, ?route, "route closed");
        match route {
            Route::Opening => {}
            Route::Mount => content.routes_mut().through_mount -= 1,
            Route::DirectReads => content.routes_mut().direct -= 1,
            Route::DirectWrites => {
                content.routes_mut().direct -= 1;
                if data.direct_writers.fetch_sub(1, Ordering::AcqRel) == 1 {
                    content.routes_mut().seen = None;
                    content.routes_mut().read_while_written = false;
                }
            }
        }
    }

    /// Takes in what direct writers did to `data`'s cache file, as of now (see [`DirectWriteCheck`]).
    pub(super) async fn note_direct_writes(
        &self,
        data: &FileData,
        look: DirectWriteCheck,
    ) -> FsResult<()> {
        if data.direct_writers.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut content = data.content.lock().await;
        let Some(mtime) = self.note_direct_writes_locked(data, &mut content, look)? else {
            return Ok(());
        };
        drop(content);
        if let Some(inode) = self.ns().get_mut(data.ino) {
            inode.attrs.mtime = mtime;
            inode.ctime = mtime;
        }
        Ok(())
    }

    /// [`Self::note_direct_writes`] for inode `ino`, if direct writers have it open (on every
    /// `getattr` and `lookup`: a file nobody writes directly costs one look at a counter).
    pub(super) async fn note_direct_writes_to(&self, ino: u64) -> FsResult<()> {
        let written = self
            .ns()
            .get(ino)
            .and_then(|i| i.file.as_ref())
            .filter(|data| data.direct_writers.load(Ordering::Acquire) > 0)
            .cloned();
        match written {
            Some(data) => {
                self.note_direct_writes(&data, DirectWriteCheck::Compare)
                    .await
            }
            None => Ok(()),
        }
    }

    /// [`Self::note_direct_writes`] under the file's lock. Returns the cache file's
    /// modification time if the file counts as changed.
    fn note_direct_writes_locked(
        &self,
        data: &FileData,
        content: &mut FileContents,
        look: DirectWriteCheck,
    ) -> FsResult<Option<SystemTime>> {
        if data.direct_writers.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        // fstat of an open local file: no disk I/O, fine on an async worker.
        let meta = content.file().metadata()?;
        let seen = (meta.len(), meta.modified()?);
        let moved = content.routes().seen != Some(seen);
        let changed = match look {
            DirectWriteCheck::Compare => moved,
            DirectWriteCheck::Changed => true,
            DirectWriteCheck::Release => moved || content.routes().read_while_written,
        };
        content.routes_mut().seen = Some(seen);
        if !changed {
            return Ok(None);
        }
        content.routes_mut().read_while_written = false;
        content.written_by_kernel(seen.0);
        data.size.store(seen.0, Ordering::Release);
        Ok(Some(seen.1))
    }

    /// Marks that an upload is about to read `data`'s cache file, taking in direct writes
    /// first so that it reads the file's current length.
    pub(super) fn upload_reads(&self, data: &FileData, content: &mut FileContents) -> FsResult<()> {
        if data.direct_writers.load(Ordering::Acquire) > 0 {
            self.note_direct_writes_locked(data, content, DirectWriteCheck::Compare)?;
            content.routes_mut().read_while_written = true;
        }
        Ok(())
    }

    /// A settled copy of cache file `source` for an upload (see the module's doc): its file,
    /// path and length. Fails, for a later try, if writes never left it alone long enough.
    pub(super) async fn settled_copy(&self, source: PathBuf) -> FsResult<(File, PathBuf, u64)> {
        let target = self.cache.snapshot_path();
        blocking(move || {
            for _ in 0..SETTLE_ATTEMPTS {
                let size = copy_cache_file(&source, &target, None)?;
                if same_start(&source, &target, size).unwrap_or(false) {
                    return Ok((File::open(&target)?, target, size));
                }
            }
            let _ = std::fs::remove_file(&target);
            Err(FsError::Io(std::io::Error::other(format!(
                "{} kept changing while copied for its upload; trying again later",
                source.display()
            ))))
        })
        .await
    }

    /// `data`'s lock, for a change (`changes`) that cannot move the cache file aside from an
    /// upload reading it, since the kernel holds it for direct handles: the change waits until
    /// no upload reads the file itself.
    pub(super) async fn lock_for_change(
        data: &FileData,
        changes: bool,
    ) -> tokio::sync::MutexGuard<'_, FileContents> {
        loop {
            let content = data.content.lock().await;
            let read = content.read_by_upload();
            if !(changes && read && Self::held_by_kernel(&content)) {
                return content;
            }
            drop(content);
            tokio::time::sleep(UPLOAD_READ_POLL).await;
        }
    }

    /// Whether the cache file must stay where it is (the kernel holds it for direct handles).
    pub(super) fn held_by_kernel(content: &FileContents) -> bool {
        content.routes().direct > 0
    }

    fn room_to_write_directly(&self) -> bool {
        self.upkeep.dirty_bytes() < self.config.cache_size / 2
            && self.cache.room_for(DIRECT_WRITE_HEADROOM)
    }

    /// The file and route of handle `fh`.
    pub(super) fn handle_route(&self, fh: u64) -> FsResult<(u64, Route)> {
        self.handles.file(fh)
    }
}

/// Whether the first `len` bytes of `file` are those of `copy`.
fn same_start(file: &Path, copy: &Path, len: u64) -> std::io::Result<bool> {
    const CHUNK: usize = 1 << 20;
    let (file, copy) = (File::open(file)?, File::open(copy)?);
    let (mut ours, mut theirs) = (vec![0; CHUNK], vec![0; CHUNK]);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        // A file cut meanwhile ends early: not the same.
        if file.read_exact_at(&mut ours[..n], at).is_err() {
            return Ok(false);
        }
        copy.read_exact_at(&mut theirs[..n], at)?;
        if ours[..n] != theirs[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::fs::{FsConfig, test_mount};
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store};

    /// Whether an open of `ino` with `flags` goes direct; the handle stays open.
    async fn opens_direct(fs: &crate::fs::Filesystem, ino: u64, flags: i32) -> (u64, bool) {
        let opened = fs.open(ino, flags).await.unwrap();
        (opened.fh, opened.direct.is_some())
    }

    /// A file whose cache file holds all of it goes direct for reads; a stored file not yet
    /// cached goes through the mount, and so do later handles while that one is open (the
    /// kernel refuses a mix of routes on one file); once it closes, the cached file goes direct.
    #[tokio::test]
    async fn reads_go_direct_only_when_the_whole_file_is_cached_and_no_handle_is_through_the_mount()
    {
        let store = Arc::new(MemoryStore::new());
        let body = Bytes::from(vec![7u8; 64 << 10]);
        store
            .put("stored", body, PutOptions::default())
            .await
            .unwrap();
        let (fs, _cache) = test_mount(store, FsConfig::default());
        fs.allow_passthrough();

        let (_, made) = fs
            .create(ROOT, "made".as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        fs.write(made.fh, 0, b"local").await.unwrap();
        fs.release(made.fh).await.unwrap();
        let made = fs.lookup(ROOT, "made".as_ref()).await.unwrap().ino;
        let (first, direct) = opens_direct(&fs, made, libc::O_RDONLY).await;
        assert!(direct, "a file made here is all cached");
        let (second, direct) = opens_direct(&fs, made, libc::O_RDONLY).await;
        assert!(direct, "a second reader joins the direct one");
        fs.release(first).await.unwrap();
        fs.release(second).await.unwrap();

        let stored = fs.lookup(ROOT, "stored".as_ref()).await.unwrap().ino;
        let (through_mount, direct) = opens_direct(&fs, stored, libc::O_RDONLY).await;
        assert!(!direct, "nothing of it is cached yet");
        let mut at = 0;
        while at < 64 << 10 {
            at += fs.read(through_mount, at, 16 << 10).await.unwrap().len() as u64;
        }
        let (meanwhile, direct) = opens_direct(&fs, stored, libc::O_RDONLY).await;
        assert!(!direct, "a handle through the mount is still open");
        fs.release(through_mount).await.unwrap();
        fs.release(meanwhile).await.unwrap();
        let (after, direct) = opens_direct(&fs, stored, libc::O_RDONLY).await;
        assert!(direct, "all cached, and no handle through the mount");
        fs.release(after).await.unwrap();
    }

    /// A writer goes direct only when its open truncates the file (new contents written and
    /// closed); one that changes a file in place goes through the mount; and without the
    /// kernel's consent nothing goes direct.
    #[tokio::test]
    async fn writers_go_direct_only_when_they_truncate() {
        let (fs, _cache) = test_mount(Arc::new(MemoryStore::new()), FsConfig::default());
        let (attr, made) = fs
            .create(ROOT, "f".as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        assert!(made.direct.is_none(), "passthrough was not allowed yet");
        fs.write(made.fh, 0, b"contents").await.unwrap();
        fs.release(made.fh).await.unwrap();
        fs.allow_passthrough();

        let (fh, direct) = opens_direct(&fs, attr.ino, libc::O_WRONLY).await;
        assert!(!direct, "an in-place writer goes through the mount");
        fs.release(fh).await.unwrap();
        let (fh, direct) = opens_direct(&fs, attr.ino, libc::O_WRONLY | libc::O_TRUNC).await;
        assert!(direct, "a truncating writer goes direct");
        fs.release(fh).await.unwrap();
    }

    /// Without passthrough in the config, the kernel's consent changes nothing.
    #[tokio::test]
    async fn passthrough_off_in_the_config_keeps_every_handle_on_the_mount() {
        let config = FsConfig {
            passthrough: false,
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(Arc::new(MemoryStore::new()), config);
        fs.allow_passthrough();
        let (attr, made) = fs
            .create(ROOT, "f".as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        fs.release(made.fh).await.unwrap();
        let (fh, direct) = opens_direct(&fs, attr.ino, libc::O_RDONLY).await;
        assert!(!direct);
        fs.release(fh).await.unwrap();
    }
}
