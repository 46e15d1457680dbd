//! fsync through the fsync log ([`crate::fsync_log`]): a changed file whose stored version the
//! mount knows sends only the bytes that changed since, as one record; folding the log's
//! records into the objects at mount; deleting records once uploads make them moot.
//!
//! An fsync goes this way when the volume has a log (an exclusive volume: one writer), the
//! file is changed, the store holds the version its changes build on (its *base*: uploaded, or
//! read from the store, under the same name), no upload of it is in flight, the kernel does not
//! write it directly, and at most [`MOST_LOGGED`] bytes changed. Otherwise it is uploaded whole
//! (`open.rs`). The file stays changed: its usual upload (at close, or after
//! `--max-dirty-age` for a file kept open) brings the object up to date and makes its records
//! moot.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{FileData, Filesystem, blocking};
use crate::cache::Partial;
use crate::error::FsResult;
use crate::fsync_log::{FileDelta, Folded, FsyncLog, fold};
use crate::store::metered::MeteredStore;
use crate::store::{ETag, SharedStore, StoreExt};

/// The most changed bytes an fsync sends as a record; a file changed more is uploaded whole.
pub const MOST_LOGGED: u64 = 4 << 20;

impl Filesystem {
    /// Gives the filesystem the fsync log of volume `volume`, in the store whose root is
    /// `root` (see [`crate::fsync_log`]). Only for the volume's one writer.
    pub fn with_fsync_log(mut self, root: SharedStore, volume: &str) -> Self {
        let store: SharedStore = Arc::new(MeteredStore::new(root, Arc::clone(&self.metrics)));
        self.fsync_log = Some(Arc::new(FsyncLog::new(store, volume)));
        self
    }

    /// fsync through the log: true once a record holds what changed in the file since its
    /// base (or an earlier one does), the records before it landed too, and the cache file is
    /// on local disk; false where the file must be uploaded whole.
    ///
    /// Records of one file may be in flight together (several committers of one database): each
    /// takes the bytes unsent when it starts, and an fsync returns once its own record and every
    /// earlier one of the file landed. If one fails, the file goes back to whole uploads.
    pub(super) async fn fsync_through_log(&self, data: &Arc<FileData>) -> FsResult<bool> {
        let Some(log) = self.fsync_log.clone() else {
            return Ok(false);
        };
        if data.direct_writers.load(Ordering::Acquire) > 0 || !self.uploads.may_upload() {
            return Ok(false);
        }
        let (key, attrs, stored) = {
            let ns = self.ns();
            match (ns.key(data.ino), ns.get(data.ino)) {
                (Some(key), Some(inode)) if ns.attached(data.ino) => (
                    key,
                    inode.attrs,
                    inode.remote.as_ref().map(|r| r.etag.clone()),
                ),
                _ => return Ok(false),
            }
        };
        let mut content = data.content.lock().await;
        if !content.dirty() {
            return Ok(false);
        }
        let Some(capture) = content.take_for_log(&key, stored.as_ref(), MOST_LOGGED) else {
            return Ok(false);
        };
        let (outcome, landed) = tokio::sync::watch::channel(None);
        let earlier = content.follow_last_record(landed);
        if capture.delta.is_empty() {
            // Its bytes are in records already sent, or being sent.
            drop(content);
            let landed = earlier_landed(earlier).await;
            outcome.send_replace(Some(landed));
            return Ok(landed);
        }
        let size = data.size.load(Ordering::Acquire);
        let file = Arc::clone(content.file());
        let spans: Vec<_> = capture.delta.written.spans().collect();
        let read = {
            let (file, spans) = (Arc::clone(&file), spans.clone());
            blocking(move || {
                spans
                    .into_iter()
                    .map(|span| {
                        let mut bytes = vec![0; (span.end - span.start) as usize];
                        file.read_exact_at(&mut bytes, span.start)?;
                        Ok(Bytes::from(bytes))
                    })
                    .collect::<FsResult<Vec<_>>>()
            })
            .await
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(err) => {
                content.forget_log_base();
                outcome.send_replace(Some(false));
                return Err(err);
            }
        };
        let number = log.next_number();
        drop(content);
        let delta = FileDelta {
            key,
            base_etag: capture.base.etag.0.clone(),
            base_size: capture.base.size,
            cut: capture.delta.cut,
            size,
            attrs: attrs.into(),
            ranges: spans.iter().map(|s| (s.start, s.end - s.start)).collect(),
        };
        let synced = blocking(move || Ok(file.sync_data()?));
        let record = [(delta, bytes)];
        let (written, synced) = tokio::join!(log.append(number, &record), synced);
        let landed = written.is_ok() && synced.is_ok() && earlier_landed(earlier).await;
        outcome.send_replace(Some(landed));
        let mut content = data.content.lock().await;
        if let Ok(record) = written {
            content.logged(record);
        }
        if !landed {
            // The store refused or did not answer: the whole upload retries as it must.
            content.forget_log_base();
            drop(content);
            synced?;
            return Ok(false);
        }
        self.metrics.fsync_logged();
        Ok(true)
    }

    /// Deletes records an upload made moot, in the background.
    pub(super) fn delete_moot_records(&self, records: Vec<String>) {
        let Some(log) = self.fsync_log.clone() else {
            return;
        };
        if records.is_empty() {
            return;
        }
        tokio::spawn(async move {
            if let Err(err) = log.delete(&records).await {
                // Moot records are harmless (folding skips them); the next mount deletes them.
                tracing::warn!("deleting {} moot fsync log records: {err}", records.len());
            }
        });
    }

    /// Folds the fsync log into the objects it changes, then deletes it; done at mount, before
    /// the first request. A key this cache still has a change of is skipped: that change holds
    /// the same bytes or newer (they were synced to local disk at the fsync). Returns how many
    /// objects were brought up to date.
    pub async fn fold_fsync_log(&self) -> FsResult<usize> {
        let Some(log) = self.fsync_log.clone() else {
            return Ok(0);
        };
        let records = log.records().await?;
        if records.is_empty() {
            return Ok(0);
        }
        let mut by_key: HashMap<String, Vec<_>> = HashMap::new();
        for record in &records {
            for file in &record.files {
                by_key
                    .entry(file.0.key.clone())
                    .or_default()
                    .push(file.clone());
            }
        }
        let mut folded = 0;
        for (key, deltas) in by_key {
            if self.change_log().latest(&key).is_some() {
                tracing::info!(
                    "fsync log: {key} has a change waiting here, which holds its records' bytes"
                );
                continue;
            }
            let Some(current) = self.store.head_opt(&key).await? else {
                tracing::info!("fsync log: {key} is no longer in the store; its records are moot");
                continue;
            };
            match fold(&current.etag.0, &deltas) {
                Some(changes) => {
                    self.put_folded(&key, changes).await?;
                    folded += 1;
                }
                None => tracing::info!(
                    "fsync log: {key} was uploaded since its records (ETag {}); they are moot",
                    current.etag.0
                ),
            }
        }
        let keys: Vec<String> = records.into_iter().map(|r| r.key).collect();
        log.delete(&keys).await?;
        if folded > 0 {
            tracing::info!(
                "brought {folded} objects up to date from {} fsync log records",
                keys.len()
            );
        }
        Ok(folded)
    }

    /// Deletes what is left of the fsync log (once every change is in the store).
    pub async fn clear_fsync_log(&self) -> FsResult<()> {
        if let Some(log) = &self.fsync_log {
            log.delete_all().await?;
        }
        Ok(())
    }

    /// Puts `key` as its base with `changes` over it: the bytes the records wrote come from a
    /// sparse file in the cache, the rest from the base (copied inside the store where a whole
    /// part is unchanged).
    async fn put_folded(&self, key: &str, changes: Folded) -> FsResult<()> {
        let path = self.cache.snapshot_path();
        let (writes, size) = (changes.writes, changes.size);
        let made = {
            let path = path.clone();
            blocking(move || {
                let file = std::fs::File::options()
                    .create_new(true)
                    .read(true)
                    .write(true)
                    .open(&path)?;
                file.set_len(size)?;
                for (offset, bytes) in writes {
                    let end = (offset + bytes.len() as u64).min(size);
                    if end > offset {
                        file.write_all_at(&bytes[..(end - offset) as usize], offset)?;
                    }
                }
                Ok(file)
            })
            .await
        };
        let put = match made {
            Ok(file) => {
                let partial = Partial {
                    etag: ETag(changes.base_etag),
                    base_end: changes.base_end,
                    changed: changes.written,
                };
                self.put_file(key, file, size, changes.attrs.into(), Some(&partial))
                    .await
            }
            Err(err) => Err(err),
        };
        let removed = path.clone();
        let _ = blocking(move || Ok(std::fs::remove_file(removed)?)).await;
        put.map(|_| ())
    }
}

/// Whether the record before one landed (true if there was none); false if its fsync ended
/// without saying (cancelled).
async fn earlier_landed(earlier: Option<super::contents::RecordOutcome>) -> bool {
    match earlier {
        None => true,
        Some(mut outcome) => outcome
            .wait_for(Option::is_some)
            .await
            .is_ok_and(|landed| *landed == Some(true)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::cache::Cache;
    use crate::fs::{Filesystem, FsConfig, SetAttrs};
    use crate::namespace::ROOT;
    use crate::store::memory::MemoryStore;
    use crate::store::{SharedStore, StoreExt};

    const SIZE: usize = 1 << 20;

    /// A mount of `data` on a fresh cache directory with the fsync log of volume `v` in `root`.
    fn mount_with_log(
        data: &Arc<MemoryStore>,
        root: &Arc<MemoryStore>,
        config: FsConfig,
    ) -> (Arc<Filesystem>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let data: SharedStore = data.clone();
        let fs = Filesystem::new(data, cache, config)
            .unwrap()
            .with_fsync_log(root.clone(), "v");
        (Arc::new(fs), dir)
    }

    /// A config under which nothing uploads unless asked (a flush, an fsync).
    fn nothing_uploads_by_itself() -> FsConfig {
        FsConfig {
            writeback_delay: Duration::from_secs(600),
            max_dirty_age: Duration::from_secs(600),
            ..FsConfig::default()
        }
    }

    async fn records(root: &MemoryStore) -> Vec<String> {
        let listed = root.list_all(".cairn/fsync/v/", false).await.unwrap();
        listed.objects.into_iter().map(|o| o.key).collect()
    }

    /// An fsync of a stored file sends what changed as one small record, not the file; a host
    /// that mounts the volume next, with none of this one's cache, folds it into the object.
    #[tokio::test]
    async fn an_fsync_sends_what_changed_and_the_next_mount_folds_it_in() {
        let original = vec![b'a'; SIZE];
        let data = crate::fs::store_holding(&[("f", &original)]).await;
        let root = Arc::new(MemoryStore::new());
        let config = nothing_uploads_by_itself();
        let (fs, _cache) = mount_with_log(&data, &root, config.clone());
        fs.start_uploader();
        let ino = fs.lookup(ROOT, "f".as_ref()).await.unwrap().ino;
        let opened = fs.open(ino, libc::O_RDWR).await.unwrap();
        fs.write(opened.fh, 100, b"bbbb").await.unwrap();
        fs.fsync(opened.fh).await.unwrap();
        fs.write(opened.fh, SIZE as u64, b"tail").await.unwrap();
        fs.setattr(
            ino,
            SetAttrs {
                size: Some(SIZE as u64 + 2),
                ..SetAttrs::default()
            },
        )
        .await
        .unwrap();
        fs.fsync(opened.fh).await.unwrap();
        fs.fsync(opened.fh).await.unwrap(); // Nothing new: no record.

        let logged = records(&root).await;
        assert_eq!(logged.len(), 2, "{logged:?}");
        for key in &logged {
            let (info, _) = root.get_all(key).await.unwrap();
            assert!(info.size < 4096, "a record of {} bytes", info.size);
        }
        let (_, body) = data.get_all("f").await.unwrap();
        assert_eq!(body, original, "the fsyncs uploaded the file");
        assert_eq!(fs.metrics().snapshot().fsyncs_logged, 2);

        // This host is gone with its cache; the next one folds the log in.
        let (next, _next_cache) = mount_with_log(&data, &root, config);
        assert_eq!(next.fold_fsync_log().await.unwrap(), 1);
        let mut expected = original.clone();
        expected[100..104].copy_from_slice(b"bbbb");
        expected.extend_from_slice(b"ta");
        let (_, body) = data.get_all("f").await.unwrap();
        assert!(body == expected, "the store does not hold what was fsynced");
        assert!(records(&root).await.is_empty(), "the log was not deleted");
    }

    /// A file fsynced, cut short, and written past where it was cut: the fold gives the bytes
    /// between the cut and the new write as zeros, not what an earlier record held there.
    #[tokio::test]
    async fn a_cut_between_records_leaves_zeros_where_earlier_records_wrote() {
        let data = crate::fs::store_holding(&[("f", &[b'a'; 1000])]).await;
        let root = Arc::new(MemoryStore::new());
        let config = nothing_uploads_by_itself();
        let (fs, _cache) = mount_with_log(&data, &root, config.clone());
        let ino = fs.lookup(ROOT, "f".as_ref()).await.unwrap().ino;
        let opened = fs.open(ino, libc::O_RDWR).await.unwrap();
        fs.write(opened.fh, 500, b"early").await.unwrap();
        fs.fsync(opened.fh).await.unwrap();
        let cut = SetAttrs {
            size: Some(100),
            ..SetAttrs::default()
        };
        fs.setattr(ino, cut).await.unwrap();
        fs.write(opened.fh, 900, b"late").await.unwrap();
        fs.fsync(opened.fh).await.unwrap();
        assert_eq!(records(&root).await.len(), 2);

        let (next, _next_cache) = mount_with_log(&data, &root, config);
        assert_eq!(next.fold_fsync_log().await.unwrap(), 1);
        let mut expected = vec![b'a'; 100];
        expected.resize(900, 0);
        expected.extend_from_slice(b"late");
        let (_, body) = data.get_all("f").await.unwrap();
        assert!(body == expected, "folded: {:?}", &body[490..510]);
    }

    /// Once the file's own upload lands, its records are moot and deleted; a later fold leaves
    /// the object alone.
    #[tokio::test]
    async fn an_upload_makes_the_records_moot() {
        let data = crate::fs::store_holding(&[("f", &[b'a'; 1000])]).await;
        let root = Arc::new(MemoryStore::new());
        let config = nothing_uploads_by_itself();
        let (fs, _cache) = mount_with_log(&data, &root, config.clone());
        fs.start_uploader();
        let ino = fs.lookup(ROOT, "f".as_ref()).await.unwrap().ino;
        let opened = fs.open(ino, libc::O_RDWR).await.unwrap();
        fs.write(opened.fh, 0, b"b").await.unwrap();
        fs.fsync(opened.fh).await.unwrap();
        assert_eq!(records(&root).await.len(), 1);
        fs.release(opened.fh).await.unwrap();
        fs.drain(Some(Duration::from_secs(10))).await.unwrap();
        let mut left = records(&root).await;
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = records(&root).await;
        }
        assert!(left.is_empty(), "moot records left: {left:?}");

        // A moot record (its deletion lost) is skipped by the fold.
        let stale = crate::fsync_log::FsyncLog::new(root.clone(), "v");
        let (delta, bytes) = (
            crate::fsync_log::FileDelta {
                key: "f".into(),
                base_etag: crate::store::content_etag(&[b'a'; 1000]).0,
                base_size: 1000,
                cut: None,
                size: 1000,
                attrs: crate::journal::StoredAttrs {
                    mode: 0o100644,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                    atime_ns: None,
                    rdev: 0,
                },
                ranges: vec![(0, 1)],
            },
            vec![Bytes::from_static(b"z")],
        );
        stale
            .append(stale.next_number(), &[(delta, bytes)])
            .await
            .unwrap();
        let (next, _next_cache) = mount_with_log(&data, &root, config);
        assert_eq!(next.fold_fsync_log().await.unwrap(), 0);
        let (_, body) = data.get_all("f").await.unwrap();
        assert_eq!(&body[..2], b"ba");
        assert!(records(&root).await.is_empty());
    }

    /// fsyncs of one file arriving together each return once the store holds what they
    /// cover, with records in flight together; when the log refuses, the fsync uploads the
    /// whole file instead, and still returns only once the store has it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fsyncs_together_share_the_log_and_a_refused_record_uploads_the_file() {
        use crate::store::faults::{FaultyStore, Op};
        use crate::store::{ErrorKind, StoreError};
        let data = crate::fs::store_holding(&[("f", &[b'a'; 100_000])]).await;
        let root = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(root.clone()));
        faulty.add_latency(Some(Op::Put), Duration::from_millis(50));
        let dir = tempfile::tempdir().unwrap();
        let config = nothing_uploads_by_itself();
        let fs = Filesystem::new(data.clone(), Cache::open(dir.path()).unwrap(), config)
            .unwrap()
            .with_fsync_log(faulty.clone(), "v");
        let fs = Arc::new(fs);
        fs.start_uploader();
        let ino = fs.lookup(ROOT, "f".as_ref()).await.unwrap().ino;
        let committers = (0..8u64).map(|i| {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move {
                let opened = fs.open(ino, libc::O_RDWR).await.unwrap();
                fs.write(opened.fh, i * 1000, &[b'0' + i as u8; 10])
                    .await
                    .unwrap();
                fs.fsync(opened.fh).await.unwrap();
                fs.release(opened.fh).await.unwrap();
            })
        });
        for committer in committers.collect::<Vec<_>>() {
            committer.await.unwrap();
        }
        let logged = records(&root).await.len();
        assert!((1..=8).contains(&logged), "{logged} records");
        let (_, body) = data.get_all("f").await.unwrap();
        assert!(
            body.iter().all(|b| *b == b'a'),
            "an fsync uploaded the file"
        );

        // The log refuses: the fsync uploads the file.
        faulty.fail_next(
            Some(Op::Put),
            1,
            StoreError::new(ErrorKind::AccessDenied, "refused"),
        );
        let opened = fs.open(ino, libc::O_RDWR).await.unwrap();
        fs.write(opened.fh, 50_000, b"last").await.unwrap();
        fs.fsync(opened.fh).await.unwrap();
        let (_, body) = data.get_all("f").await.unwrap();
        assert_eq!(&body[50_000..50_004], b"last");
        for i in 0..8 {
            let at = i * 1000;
            assert_eq!(body[at..at + 10], [b'0' + i as u8; 10]);
        }
    }
}
