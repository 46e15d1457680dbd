//! Opening and closing files: open (close-to-open freshness, the kernel's page cache, the
//! route), flush (a close: the upload is logged, due after the write-back delay), fsync (waits
//! until the store holds the file, or with `fsync=local` until the local disk does) and release.
//!
//! Touches the handles, a file's contents (through its methods), the change log (through
//! `queue_upload`) and the uploader's wait.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::direct::{DirectWriteCheck, OpenIntent, Route};
use super::reply::Opened;
use super::{Filesystem, blocking};
use crate::error::{FsError, FsResult};

impl Filesystem {
    pub(super) fn new_handle(&self, ino: u64) -> u64 {
        self.handles.open_file(ino, self.config.block_size)
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
            content.opened_by_kernel(truncates)
        };
        let fh = self.new_handle(ino);
        let truncated = if truncates {
            self.truncate(ino, 0).await
        } else {
            Ok(())
        };
        let open = if writes {
            OpenIntent::of_writer(flags, truncates)
        } else {
            OpenIntent::Reads
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

    pub(super) fn handle_ino(&self, fh: u64) -> FsResult<u64> {
        Ok(self.handles.file(fh)?.0)
    }

    /// Close: the file's upload is scheduled after the write-back delay.
    /// A close (FLUSH) answered on the spot, with no task, where it has nothing to record: the
    /// file is clean (its lock free) and no one writes it directly. `None`: ask
    /// [`Filesystem::flush`].
    pub fn flush_at_once(&self, fh: u64) -> Option<FsResult<()>> {
        let ino = match self.handle_ino(fh) {
            Ok(ino) => ino,
            Err(err) => return Some(Err(err)),
        };
        let Some(data) = self.loaded_file(ino) else {
            return Some(Ok(()));
        };
        if data.direct_writers.load(Ordering::Acquire) > 0 {
            return None;
        }
        let content = data.content.try_lock().ok()?;
        (!content.dirty()).then_some(Ok(()))
    }

    /// A release answered on the spot where it has nothing to record (see
    /// [`Self::flush_at_once`]): a handle that does not write directly, of a clean file whose
    /// lock is free. `None`: ask [`Filesystem::release`].
    pub fn release_at_once(&self, fh: u64) -> Option<FsResult<()>> {
        let (ino, route) = match self.handle_route(fh) {
            Ok(found) => found,
            Err(err) => return Some(Err(err)),
        };
        if route == Route::DirectWrites {
            return None;
        }
        let Some(data) = self.loaded_file(ino) else {
            self.handles.close(fh);
            return Some(Ok(()));
        };
        let mut content = data.content.try_lock().ok()?;
        if content.dirty() {
            return None;
        }
        self.handles.close(fh);
        Self::count_closed_locked(&data, &mut content, route);
        if data.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drop_if_clean_locked(&data, &content);
        }
        Some(Ok(()))
    }

    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        let Some(data) = self.loaded_file(ino) else {
            return Ok(());
        };
        self.note_direct_writes(&data, DirectWriteCheck::Compare)
            .await?;
        self.queue_upload(&data, true).await?;
        Ok(())
    }

    /// fsync: returns once the file is in the store (with what its upload waits for: an earlier
    /// change of its key, its directories' markers), or with `fsync_local`, once it is on local
    /// disk. Unrelated changes made before it keep their write-back delay. A file whose stored
    /// version the mount knows sends only what changed, as a record of the fsync log
    /// (`durable`).
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let ino = self.handle_ino(fh)?;
        let Some(data) = self.loaded_file(ino) else {
            return Ok(());
        };
        self.note_direct_writes(&data, DirectWriteCheck::Changed)
            .await?;
        if self.config.fsync_local {
            self.queue_upload(&data, true).await?;
            let file = Arc::clone(data.content.lock().await.file());
            blocking(move || Ok(file.sync_all()?)).await?;
            return self.update_change_log(|j| j.sync()).await;
        }
        if self.fsync_through_log(&data).await? {
            return Ok(());
        }
        match self.queue_upload(&data, false).await? {
            Some(seq) => self.wait_stored(vec![seq]).await,
            None => Ok(()),
        }
    }

    /// fsync of a directory: returns once the store holds the pending changes of its entries
    /// (files made, removed or renamed in it), or with `fsync_local`, once the change log is on
    /// local disk.
    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        if self.config.fsync_local {
            return self.update_change_log(|j| j.sync()).await;
        }
        let prefix = self.ns().dir_prefix(ino).ok_or(FsError::NotFound)?;
        let pending: Vec<u64> = self.change_log().children(&prefix).map(|e| e.seq).collect();
        self.wait_stored(pending).await
    }

    /// Makes the changes `seqs` due now, with what they wait for, and waits until the store
    /// holds them.
    async fn wait_stored(&self, seqs: Vec<u64>) -> FsResult<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let hurried = seqs.clone();
        self.update_change_log(move |j| j.hurry_with_predecessors(&hurried))
            .await?;
        for seq in seqs {
            self.wait_applied(seq).await?;
        }
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let (ino, route) = self.handle_route(fh)?;
        self.handles.close(fh);
        let data = self.loaded_file(ino);
        if let Some(data) = data {
            let noted = match route {
                Route::DirectWrites => {
                    self.note_direct_writes(&data, DirectWriteCheck::Release)
                        .await
                }
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::fs::{Filesystem, FsConfig, store_holding, test_mount};
    use crate::journal::Change;
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOptions, Store};

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
            let pending = fs.change_log().latest(&name).map(|e| e.change.clone());
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
            let pending = fs.change_log().latest(&target).map(|e| e.change.clone());
            assert_eq!(
                pending,
                Some(Change::Delete),
                "round {round}: the store's {target} would stay"
            );
        }
    }

    /// An fsync waits for its own file, not for unrelated changes made before it, which keep
    /// their write-back delay; an fsync of a directory waits for the changes of its entries.
    #[tokio::test]
    async fn an_fsync_waits_for_its_own_file_and_a_directory_fsync_for_its_entries() {
        let store = Arc::new(MemoryStore::new());
        let config = FsConfig {
            writeback_delay: Duration::from_secs(600),
            ..FsConfig::default()
        };
        let (fs, _cache) = test_mount(store.clone(), config);
        fs.start_uploader();
        let write = |name: &'static str, parent: u64| {
            let fs = Arc::clone(&fs);
            async move {
                let (_, opened) = fs
                    .create(parent, name.as_ref(), 0o644, 0, 0, 0, 0)
                    .await
                    .unwrap();
                fs.write(opened.fh, 0, name.as_bytes()).await.unwrap();
                opened.fh
            }
        };
        let earlier = write("earlier", ROOT).await;
        fs.release(earlier).await.unwrap();
        let synced = write("synced", ROOT).await;
        fs.fsync(synced).await.unwrap();
        assert!(store.head("synced").await.is_ok(), "fsync returned: stored");
        assert!(
            store.head("earlier").await.is_err(),
            "unrelated: still waiting"
        );
        fs.release(synced).await.unwrap();

        let dir = fs
            .mkdir(ROOT, "d".as_ref(), 0o755, 0, 0, 0)
            .await
            .unwrap()
            .ino;
        let inside = write("inside", dir).await;
        fs.release(inside).await.unwrap();
        fs.fsyncdir(dir).await.unwrap();
        assert!(
            store.head("d/inside").await.is_ok(),
            "an entry of the directory"
        );
        assert!(store.head("earlier").await.is_err(), "not an entry of it");
    }

    /// Closing a clean file is answered on the spot and lets its open state go with the last
    /// handle; a changed file's close goes the long way, which records its upload.
    #[tokio::test]
    async fn closing_a_clean_file_is_answered_at_once_and_a_changed_one_is_not() {
        let store = store_holding(&[("clean", b"stored")]).await;
        let (fs, _cache) = test_mount(store, FsConfig::default());
        let ino = fs.lookup(ROOT, "clean".as_ref()).await.unwrap().ino;
        let fh = fs.open(ino, libc::O_RDONLY).await.unwrap().fh;
        assert_eq!(&fs.read(fh, 0, 100).await.unwrap()[..], b"stored");
        assert!(matches!(fs.flush_at_once(fh), Some(Ok(()))));
        assert!(matches!(fs.release_at_once(fh), Some(Ok(()))));
        assert!(fs.read(fh, 0, 1).await.is_err(), "the handle is gone");
        assert!(
            fs.ns().get(ino).unwrap().file.is_none(),
            "no open state left"
        );

        let (made, opened) = fs
            .create(ROOT, "changed".as_ref(), 0o644, 0, 0, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, b"new").await.unwrap();
        assert!(fs.flush_at_once(opened.fh).is_none());
        assert!(fs.release_at_once(opened.fh).is_none());
        fs.release(opened.fh).await.unwrap();
        assert!(
            fs.change_log().latest("changed").is_some(),
            "its upload is recorded"
        );
        assert_eq!(fs.getattr(made.ino).await.unwrap().size, 3);
    }
}
