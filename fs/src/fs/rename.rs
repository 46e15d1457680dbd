//! Renames. A file moves in the inode table and the cache index at once, and its new key gets
//! what it is (its cache file, its symlink target, or a copy of its object inside the store)
//! followed by a delete of the old key, both in the change log in that order. A directory moves
//! in the store itself (copy every key, delete the originals) after everything before it is
//! uploaded: not atomic for other readers of the bucket (docs/SEMANTICS.md).

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use super::names::{check_name, check_new_name};
use super::{Filesystem, blocking};
use crate::attrs::{Attrs, Kind};
use crate::error::{FsError, FsResult};
use crate::journal::{Change, StoredAttrs};
use crate::store::{ErrorKind, PutOptions, StoreExt};

impl Filesystem {
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
                    self.change_log().latest(&source_key).map(|e| &e.change),
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
            .update_change_log(move |j| {
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
        let pending = self.change_log().latest(key).map(|e| e.change.clone());
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
            if content.dirty() {
                return Ok(Change::PutFile {
                    cache_file: content.cache_name().to_string(),
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
        self.update_change_log(move |j| j.hurry(&name)).await?;
        self.wake.notify_one();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.change_log().latest(key).is_some() {
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::fs::{FsConfig, test_mount};

    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store, StoreExt};

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
}
