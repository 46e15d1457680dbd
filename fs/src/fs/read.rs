//! Reads: from the cache file, fetching what it lacks from the store with several ranged GETs
//! in flight (read-ahead beyond the read is `readahead`'s). A read of bytes the page cache holds
//! is answered on the spot, without a task or a blocking thread (`read_at_once`).
//!
//! Also here: bringing a partial file whole (`make_whole`, `materialize`) and taking a new
//! version of a clean file when the store's changed. Touches a file's contents through its
//! methods, the cache index (what a clean file holds), and the store (GET and HEAD only).

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use super::contents::{FileContents, FileData};
use super::{Filesystem, blocking};
use crate::cache::{self};
use crate::error::{FsError, FsResult};
use crate::journal::Change;
use crate::namespace::Remote;
use crate::store::{ErrorKind, GetOptions};

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

pub(super) fn read_at(file: &File, range: Range<u64>) -> FsResult<Vec<u8>> {
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
    /// The key to read a file's store version from: its own, or while a rename is pending, the
    /// key it was copied from.
    pub(super) fn fetch_key(&self, key: &str) -> String {
        match self.change_log().latest(key).map(|e| &e.change) {
            Some(Change::Copy { from, .. }) => from.clone(),
            _ => key.to_string(),
        }
    }

    /// The read-ahead window for a read at `offset` through `fh` (see [`Handles::read_window`]).
    pub(super) fn readahead(&self, fh: u64, offset: u64, size: u64) -> u64 {
        let (block, max) = (self.config.block_size, self.config.max_readahead);
        self.handles.read_window(fh, offset, size, block, max)
    }

    /// Makes `want` (clipped to what the store holds) present in the cache file, fetching the
    /// missing blocks with several requests in flight, while the caller holds the file's lock.
    pub(super) async fn fetch(
        &self,
        key: &str,
        content: &mut FileContents,
        want: Range<u64>,
    ) -> FsResult<()> {
        let limit = content.remote_limit();
        if want.start >= limit {
            return Ok(());
        }
        let want_end = want.end.min(limit);
        if content.present().contains(want.start..want_end) {
            return Ok(());
        }
        let block = self.config.block_size;
        let start = want.start / block * block;
        let end = want_end.div_ceil(block).saturating_mul(block).min(limit);
        // Half a part a request: each body is held whole until written (read-ahead streams
        // its larger requests instead, see readahead.rs).
        let chunk = block.max(self.config.part_size / 2);
        let pieces: Vec<Range<u64>> = content
            .present()
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
        let etag = content.etag().cloned();
        let file = Arc::clone(content.file());
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
            content.fetched(range);
        }
        if let Some(etag) = content.etag()
            && !content.dirty()
        {
            let (cache, key, name, etag, present) = (
                self.cache.clone(),
                key.to_string(),
                content.cache_name().to_string(),
                etag.clone(),
                content.present().clone(),
            );
            if let Err(err) =
                blocking(move || cache.index_version(&key, &name, &etag, &present)).await
            {
                // The bytes are cached all the same; the index forgets them (a full disk).
                tracing::warn!(
                    "could not record what is cached of {}: {err}",
                    content.cache_name()
                );
            }
        }
        Ok(())
    }

    /// Fetches what a partial file lacks, so that it no longer needs its base version (before
    /// that version's key is renamed or replaced).
    pub(super) async fn make_whole(
        &self,
        key: &str,
        content: &mut FileContents,
        size: u64,
    ) -> FsResult<()> {
        if !content.is_partial() {
            return Ok(());
        }
        self.materialize(key, content, size).await?;
        content.made_whole(size);
        let (cache, name) = (self.cache.clone(), content.cache_name().to_string());
        blocking(move || cache.forget_partial(&name)).await
    }

    /// [`Self::make_whole`] for the file `ino`, whether open or only waiting for its upload.
    pub(super) async fn make_whole_file(&self, ino: u64, key: &str) -> FsResult<()> {
        let open = self.loaded_file(ino);
        let data = match open {
            Some(data) => data,
            None => {
                let pending = matches!(
                    self.change_log().latest(key).map(|e| &e.change),
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
    pub(super) async fn materialize(
        &self,
        key: &str,
        content: &mut FileContents,
        size: u64,
    ) -> FsResult<()> {
        match self.fetch(key, content, 0..size).await {
            Err(FsError::Store(err)) if err.kind() == ErrorKind::PreconditionFailed => {
                let info = self.store.head(&self.fetch_key(key)).await?;
                tracing::info!("{key} changed in the store; taking its current version");
                content.take_store_version(key, info.etag, info.size);
                self.fetch(key, content, 0..size).await
            }
            other => other,
        }
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
        let limit = content.remote_limit();
        if offset >= end || (offset < limit && !content.present().contains(offset..limit)) {
            return None;
        }
        let file = Arc::clone(content.file());
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
        let stored_end = end.min(content.remote_limit());
        self.metrics
            .cache_read(offset >= stored_end || content.present().contains(offset..stored_end));
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
        let file = Arc::clone(content.file());
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
        content: &FileContents,
        range: Range<u64>,
    ) -> Option<FsResult<Bytes>> {
        if content.dirty() || range.end > content.remote_limit() {
            return None;
        }
        let options = GetOptions {
            range: Some(range),
            if_match: content.etag().cloned(),
        };
        let got = self.store.get(&self.fetch_key(key), options).await;
        Some(got.map(|got| got.body).map_err(FsError::from))
    }

    /// Drops cached contents of a clean file and takes the store's current version.
    async fn refresh(&self, ino: u64, data: &FileData) -> FsResult<()> {
        let key = self.key_of(ino)?;
        let info = self.store.head(&self.fetch_key(&key)).await?;
        let mut content = data.content.lock().await;
        if content.dirty() {
            return Ok(());
        }
        content.take_store_version(&key, info.etag.clone(), info.size);
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    use crate::fs::{FsConfig, test_mount};

    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store};

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
}
