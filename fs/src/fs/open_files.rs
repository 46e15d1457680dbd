//! The open files: a file's `FileData` is loaded on first use (from a pending upload's cache
//! file, or from the cache index for a clean file) and registered by cache file name, so the
//! uploader finds what it uploads; it is let go once no one has it open and it is clean. Also
//! the cleanup of cache files that nothing names after a crash.
//!
//! Owns the registry of open files (`Filesystem::files`), the first lock in the lock order.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::contents::{FileContents, FileData};
use super::{Filesystem, blocking};
use crate::attrs::Kind;
use crate::cache::RangeSet;
use crate::error::{FsError, FsResult};
use crate::journal::Change;

impl Filesystem {
    /// The open state of a file's contents if the mount holds it now (the file is open or
    /// changed), without loading it.
    pub(super) fn loaded_file(&self, ino: u64) -> Option<Arc<FileData>> {
        self.ns().get(ino).and_then(|inode| inode.file.clone())
    }

    /// The open state of a file's contents: from a pending change's cache file, or from the
    /// cache index, on first use.
    pub(super) async fn file_data(&self, ino: u64) -> FsResult<Arc<FileData>> {
        // The common case, on every read and write: the file is already open here.
        if let Some(data) = self.loaded_file(ino) {
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
            let pending_file = match self.change_log().latest(&key).map(|e| &e.change) {
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
                let content = FileContents::pending(cache_name, file, length, partial);
                (content, length)
            }
            (None, Some(remote)) => {
                let journal = Arc::clone(&self.journal);
                let cache = self.cache.clone();
                let etag = remote.etag.clone();
                let base_key = key.clone();
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
                let limit = remote.size.min(size);
                let content =
                    FileContents::stored(&base_key, cache_name, file, present, remote.etag, limit);
                (content, size)
            }
            (None, None) => {
                return Err(FsError::Io(std::io::Error::other(format!(
                    "{key} has no contents: none waiting here and none known in the store"
                ))));
            }
        };
        let name = content.cache_name().to_string();
        let data = Arc::new(FileData::new(ino, content, size));
        registry.insert(name, Arc::downgrade(&data));
        let mut ns = self.ns();
        let inode = ns.get_mut(ino).ok_or(FsError::NotFound)?;
        Ok(Arc::clone(inode.file.get_or_insert(data)))
    }

    /// A new file's contents: an empty cache file, changed from the start.
    pub(super) async fn new_file_data(&self, ino: u64) -> FsResult<Arc<FileData>> {
        let mut registry = self.files.lock().await;
        let cache = self.cache.clone();
        let (name, file) = match cache.spare_file() {
            Some(spare) => spare,
            None => blocking(move || cache.new_file()).await?,
        };
        let data = Arc::new(FileData::new(
            ino,
            FileContents::created(name.clone(), file),
            0,
        ));
        registry.insert(name, Arc::downgrade(&data));
        if let Some(inode) = self.ns().get_mut(ino) {
            inode.file = Some(Arc::clone(&data));
        }
        Ok(data)
    }

    /// Frees a file's in-memory state once no one has it open and it is in the store.
    pub(super) async fn drop_if_clean(&self, data: &Arc<FileData>) {
        let content = data.content.lock().await;
        self.drop_if_clean_locked(data, &content);
    }

    /// [`Self::drop_if_clean`] under the file's lock.
    pub(super) fn drop_if_clean_locked(&self, data: &Arc<FileData>, content: &FileContents) {
        if content.dirty() || data.opens.load(Ordering::Acquire) > 0 {
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
    pub(super) async fn drop_cache_file_if_unused(&self, data: &Arc<FileData>) {
        let name = data.content.lock().await.cache_name().to_string();
        if !self.uploads_cache_file(&name) {
            self.cache.discard_file(&name);
            self.files.lock().await.remove(&name);
        }
    }

    /// Whether a pending change will upload cache file `name`.
    pub(super) fn uploads_cache_file(&self, name: &str) -> bool {
        self.change_log().uploads_cache_file(name)
    }

    /// Cache files that pending changes will upload.
    pub(super) fn referenced_cache_files(&self) -> std::collections::HashSet<String> {
        self.change_log()
            .entries()
            .filter_map(|e| match &e.change {
                Change::PutFile { cache_file, .. } => Some(cache_file.clone()),
                _ => None,
            })
            .collect()
    }

    /// Removes cache files that neither the index nor a pending change names (left by a crash).
    pub(super) fn remove_orphaned_cache_files(&self) -> FsResult<()> {
        let mut known = self.referenced_cache_files();
        known.extend(self.cache.indexed_files()?);
        for name in self.cache.all_files()? {
            if !known.contains(&name) {
                self.cache.discard_file(&name);
            }
        }
        Ok(())
    }
}
