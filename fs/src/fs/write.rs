//! Writes and truncation: a file's first change makes it dirty (whole: fetching what it lacks
//! first; partial: a large stored file keeps its unfetched bytes in the store), then bytes go
//! into the cache file and `FileContents` records what happened. A change while an upload reads
//! the cache file first moves the file to a copy (`copy_aside`). `queue_upload` logs the file's
//! contents for upload: at a close, an fsync, or when kept open and written past its maximum
//! dirty age.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::contents::{FileContents, FileData};
use super::{Filesystem, blocking};
use crate::error::{FsError, FsResult};
use crate::journal::Change;

/// How long a write on a full cache disk waits for uploads to free room before ENOSPC.
const ROOM_WAIT: Duration = Duration::from_secs(30);

impl Filesystem {
    /// Whether a file about to change may keep its unfetched bytes in the store: it is large,
    /// its object is under its own key (no rename is pending), and it is not all cached.
    fn may_stay_partial(&self, key: &str, content: &FileContents, size: u64) -> bool {
        let base_end = content.remote_limit().min(size);
        !key.is_empty()
            && content.etag().is_some()
            && base_end >= self.config.copy_threshold
            && self.fetch_key(key) == key
            && !content.present().contains(0..base_end)
    }

    /// Marks the contents changed locally: the index stops describing them. A large stored
    /// file not all cached keeps the rest in the store (see [`FileContents::partial`]); any other
    /// fetches what it lacks first.
    pub(super) async fn make_dirty(
        &self,
        ino: u64,
        content: &mut FileContents,
        size: u64,
    ) -> FsResult<()> {
        if content.read_by_upload() && !Self::held_by_kernel(content) {
            self.copy_aside(content).await?;
        }
        if !content.dirty() {
            // An unlinked file still open has no key, and nothing left to fetch.
            let key = self.key_of(ino).unwrap_or_default();
            if self.may_stay_partial(&key, content, size) {
                content.start_partial_change(size);
                let partial = content
                    .partial()
                    .expect("a partial file has a base version");
                let (cache, file, name) = (
                    self.cache.clone(),
                    Arc::clone(content.file()),
                    content.cache_name().to_string(),
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
                content.start_whole_change(size);
                let cache = self.cache.clone();
                blocking(move || cache.forget(&key)).await?;
            }
        }
        content.count_change();
        Ok(())
    }

    /// Copy on write: the uploader is reading this file's cache file, so before the file
    /// changes, its bytes move to a copy that takes the cache file's place; the upload goes on
    /// reading the version it started with. A partial file's copy holds only the bytes it has.
    pub(super) async fn copy_aside(&self, content: &mut FileContents) -> FsResult<()> {
        let path = self.cache.path_of(content.cache_name());
        let copy = self.cache.snapshot_path();
        let spans = content.partial().map(|_| content.present().clone());
        let file = blocking(move || {
            // The directory is synced too: an fsync of the file (fsync=local) must find the
            // copy under the cache file's name after a power loss.
            let replaced = crate::cache::copy_cache_file(&path, &copy, spans.as_ref())
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
        content.moved_to(file);
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
        let (file, len) = (Arc::clone(content.file()), bytes.len() as u64);
        blocking(move || Ok(file.write_all_at(&bytes, offset)?)).await?;
        let new_size = size.max(offset + len);
        let covered = content.changed_covers(offset..offset + len);
        content.wrote(offset..offset + len, new_size);
        if !covered && let Some(partial) = content.partial() {
            // Recorded before the write returns: after a crash, the upload must know these
            // bytes are the file's own, not the base version's.
            let (cache, name) = (self.cache.clone(), content.cache_name().to_string());
            blocking(move || cache.record_partial(&name, &partial)).await?;
        }
        data.size.store(new_size, Ordering::Release);
        drop(content);
        self.contents_changed(ino, new_size);
        Ok(len as u32)
    }

    pub(super) async fn truncate(&self, ino: u64, new_size: u64) -> FsResult<()> {
        let data = self.file_data(ino).await?;
        let mut content = Self::lock_for_change(&data, true).await;
        let size = data.size.load(Ordering::Acquire);
        // Only the bytes that survive need fetching.
        content.limit_store_bytes(new_size);
        self.make_dirty(ino, &mut content, new_size.min(size))
            .await?;
        let file = Arc::clone(content.file());
        blocking(move || Ok(file.set_len(new_size)?)).await?;
        let (cache, name) = (self.cache.clone(), content.cache_name().to_string());
        content.truncated(new_size);
        match content.partial() {
            Some(partial) => blocking(move || cache.record_partial(&name, &partial)).await?,
            None => blocking(move || cache.forget_partial(&name)).await?,
        }
        data.size.store(new_size, Ordering::Release);
        drop(content);
        self.contents_changed(ino, new_size);
        Ok(())
    }

    /// The inode of a file whose contents just changed: its new size, and now as its mtime and
    /// ctime.
    fn contents_changed(&self, ino: u64, size: u64) {
        if let Some(inode) = self.ns().get_mut(ino) {
            let now = SystemTime::now();
            inode.attrs.mtime = now;
            inode.ctime = now;
            inode.size = size;
        }
    }

    /// Records a changed file's contents in the change log (unless already recorded), due after
    /// the write-back delay or now. Returns the change's sequence number, if one is pending.
    pub(super) async fn queue_upload(
        &self,
        data: &FileData,
        delayed: bool,
    ) -> FsResult<Option<u64>> {
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
        let recorded = content.queued() && self.change_log().latest(&key).is_some();
        if !content.dirty() || recorded {
            if delayed {
                return Ok(self.change_log().latest(&key).map(|e| e.seq));
            }
            let hurried = key.clone();
            return self.update_change_log(move |j| j.hurry(&hurried)).await;
        }
        let change = Change::PutFile {
            cache_file: content.cache_name().to_string(),
            attrs: attrs.into(),
        };
        let seq = self.log_change(&key, change, in_store, delayed).await?;
        content.queued_for_upload();
        Ok(seq)
    }
}
