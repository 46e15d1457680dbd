//! Putting a file's contents: its snapshot (the cache file itself, marked as read by an upload,
//! or a settled copy while the kernel writes it directly, or a copy of a file no one holds),
//! then one put or a multipart upload with parts in parallel; with no room for a snapshot, the
//! cache file itself, held still.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};

use super::Applied;
use super::plan::plan_parts;
use crate::attrs::{Attrs, Kind};
use crate::cache::Partial;
use crate::cache::copy_cache_file;
use crate::error::{FsError, FsResult};
use crate::fs::contents::FileData;
use crate::fs::read::read_at;
use crate::fs::{Filesystem, blocking};
use crate::journal::Entry;
use crate::store::{ETag, ErrorKind, GetOptions, PartSource, PutCondition, PutOptions, StoreError};

/// A file's contents taken for an upload.
pub(super) struct Snapshot {
    /// Opened before anything could replace it (see [`Filesystem::copy_aside`]).
    pub(super) file: std::fs::File,
    pub(super) path: PathBuf,
    /// Held while the upload reads the cache file itself (see [`Filesystem::copy_aside`]); None
    /// for a copy, removed after the upload.
    pub(super) reading: Option<Arc<()>>,
    pub(super) size: u64,
    /// The open file it was taken from, and its generation then.
    pub(super) holder: Option<(Arc<FileData>, u64)>,
    /// For a partial file: where the bytes it lacks come from.
    pub(super) partial: Option<Partial>,
    /// Held while the upload of an open file is in flight (see `FileContents::upload_started`).
    pub(super) _in_flight: Option<Arc<()>>,
}

impl Filesystem {
    /// The contents to upload: for a file the mount holds state for, the cache file itself,
    /// marked as uploading (see [`Filesystem::copy_aside`]); otherwise a copy taken while no one
    /// can open the file. None if the cache file is gone. A partial file's snapshot holds only
    /// its own bytes; the rest stay in the store.
    pub(super) async fn snapshot(&self, cache_file: &str) -> FsResult<Option<Snapshot>> {
        let registry = self.files.lock().await;
        let holder = registry.get(cache_file).and_then(std::sync::Weak::upgrade);
        let source = self.cache.path_of(cache_file);
        if let Some(data) = holder {
            let mut content = data.content.lock().await;
            drop(registry);
            self.upload_reads(&data, &mut content)?;
            let in_flight = Some(content.upload_started());
            if data.direct_writers.load(Ordering::Acquire) > 0 {
                let generation = content.generation();
                drop(content);
                let (file, path, size) = self.settled_copy(source).await?;
                return Ok(Some(Snapshot {
                    file,
                    path,
                    reading: None,
                    size,
                    holder: Some((data, generation)),
                    partial: None,
                    _in_flight: in_flight,
                }));
            }
            let path = source.clone();
            let file = blocking(move || Ok(std::fs::File::open(path)?)).await?;
            return Ok(Some(Snapshot {
                file,
                path: source,
                reading: Some(content.upload_reader()),
                size: data.size.load(Ordering::Acquire),
                partial: content.partial(),
                holder: Some((Arc::clone(&data), content.generation())),
                _in_flight: in_flight,
            }));
        }
        let (cache, name) = (self.cache.clone(), cache_file.to_string());
        let partial = blocking(move || cache.partial(&name)).await?;
        let target = self.cache.snapshot_path();
        let (from, to, spans) = (source, target.clone(), partial.clone());
        let copied = blocking(move || {
            let copied = copy_cache_file(&from, &to, spans.as_ref().map(|p| &p.changed));
            match copied.and_then(|size| Ok((std::fs::File::open(&to)?, size))) {
                Ok(opened) => Ok(Some(opened)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => {
                    let _ = std::fs::remove_file(&to);
                    Err(e.into())
                }
            }
        })
        .await?;
        drop(registry);
        Ok(copied.map(|(file, size)| Snapshot {
            file,
            path: target,
            reading: None,
            size,
            holder: None,
            partial,
            _in_flight: None,
        }))
    }

    /// With no room on the cache disk for a snapshot, uploads the cache file itself, holding the
    /// file still (its writers, or with no one writing, any open) until the store has it.
    pub(super) async fn put_in_place(
        &self,
        entry: &Entry,
        cache_file: &str,
        attrs: Attrs,
    ) -> FsResult<Applied> {
        let registry = self.files.lock().await;
        let holder = registry.get(cache_file).and_then(std::sync::Weak::upgrade);
        let path = self.cache.path_of(cache_file);
        let opened = blocking(move || {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        });
        let Ok((file, size)) = opened.await else {
            return Ok(Applied::Dropped(format!(
                "the cache file of {} is gone",
                entry.key
            )));
        };
        let (etag, generation, partial) = match &holder {
            Some(data) => {
                let content = data.content.lock().await;
                drop(registry);
                if data.direct_writers.load(Ordering::Acquire) > 0 {
                    return Err(FsError::Io(std::io::Error::other(format!(
                        "no room on the cache disk to copy {} while it is written; \
                         it is uploaded once closed, or once there is room",
                        entry.key
                    ))));
                }
                let partial = content.partial();
                let etag = self
                    .put_file(&entry.key, file, size, attrs, partial.as_ref())
                    .await?;
                (etag, content.generation(), partial)
            }
            None => {
                let (cache, name) = (self.cache.clone(), cache_file.to_string());
                let partial = blocking(move || cache.partial(&name)).await?;
                let etag = self
                    .put_file(&entry.key, file, size, attrs, partial.as_ref())
                    .await?;
                drop(registry);
                (etag, 0, partial)
            }
        };
        let holder = holder.map(|data| (data, generation));
        let etag_for_inode = etag.clone();
        self.after_put(entry, cache_file, etag, size, holder, partial)
            .await?;
        Ok(Applied::Done {
            bytes: size,
            stored: Some((Kind::File, etag_for_inode, size)),
        })
    }

    /// Uploads `size` bytes of `file` to `key`: one put, or a multipart upload with
    /// parts in parallel for large files. For a partial file, a part it holds none of is copied
    /// from the base version inside the store, and the base's bytes of a part it holds some of
    /// are fetched.
    pub(in crate::fs) async fn put_file(
        &self,
        key: &str,
        file: std::fs::File,
        size: u64,
        attrs: Attrs,
        partial: Option<&Partial>,
    ) -> FsResult<ETag> {
        let metadata = attrs.encode();
        let file = Arc::new(file);
        if size <= self.config.single_put_limit {
            let body = self.read_part(key, &file, 0..size, partial).await?;
            let put = self
                .store
                .put(key, body, PutOptions::with_metadata(metadata))
                .await?;
            return Ok(put.etag);
        }
        let plan = plan_parts(size, self.config.part_size, partial);
        let upload = self.store.start_multipart(key, metadata).await?;
        let parts = stream::iter(plan.into_iter().zip(1u32..))
            .map(|((range, copied), number)| {
                let (file, upload) = (Arc::clone(&file), &upload);
                async move {
                    if let Some(partial) = partial
                        && copied
                    {
                        let source = PartSource {
                            key: key.to_string(),
                            range,
                            if_match: Some(partial.etag.clone()),
                        };
                        let part = self
                            .store
                            .upload_part_copy(key, upload, number, &source)
                            .await?;
                        return Ok::<_, FsError>(part);
                    }
                    let body = self.read_part(key, &file, range, partial).await?;
                    let part = self.store.upload_part(key, upload, number, body).await?;
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

    /// The bytes `range` of a file to upload: from its snapshot, and for a partial file, the
    /// base version's bytes where the snapshot has none.
    async fn read_part(
        &self,
        key: &str,
        file: &Arc<std::fs::File>,
        range: std::ops::Range<u64>,
        partial: Option<&Partial>,
    ) -> FsResult<Bytes> {
        let file = Arc::clone(file);
        let local = range.clone();
        let mut body = blocking(move || read_at(&file, local)).await?;
        for gap in partial
            .map(|p| p.from_base(range.clone()))
            .unwrap_or_default()
        {
            let options = GetOptions {
                range: Some(gap.clone()),
                if_match: partial.map(|p| p.etag.clone()),
            };
            let got = self.store.get(key, options).await?;
            if got.range != gap {
                return Err(FsError::Store(StoreError::new(
                    ErrorKind::PreconditionFailed,
                    format!("{key}: the store gave bytes {:?} of {gap:?}", got.range),
                )));
            }
            let at = (gap.start - range.start) as usize;
            body[at..at + got.body.len()].copy_from_slice(&got.body);
        }
        Ok(Bytes::from(body))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::cache::Cache;
    use crate::fs::{Filesystem, FsConfig};
    use crate::namespace::ROOT;
    use crate::store::StoreExt;
    use crate::store::memory::MemoryStore;

    const MIB: u64 = 1 << 20;

    /// The upload reads the cache file itself; a write while it does moves the file to a copy
    /// first, so the store gets the version of the close, whole, and then the new one; the
    /// uploaded file is never copied when no one writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_the_upload_of_a_file_goes_to_a_copy() {
        use crate::store::faults::{FaultyStore, Op};
        let memory = Arc::new(MemoryStore::new());
        let faulty = Arc::new(FaultyStore::new(memory.clone()));
        faulty.add_latency(Some(Op::UploadPart), Duration::from_millis(150));
        let cache_dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            writeback_delay: Duration::from_secs(2),
            single_put_limit: 8 * MIB,
            concurrency: 1,
            ..FsConfig::default()
        };
        let cache = Cache::open(cache_dir.path()).unwrap();
        let fs = Arc::new(Filesystem::new(faulty.clone(), cache, config).unwrap());
        fs.start_uploader();
        let size = 40 * MIB as usize;
        let flags = libc::O_WRONLY | libc::O_CREAT;
        let (attr, opened) = fs
            .create(ROOT, "f".as_ref(), 0o644, 0o022, flags, 0, 0)
            .await
            .unwrap();
        fs.write(opened.fh, 0, &vec![b'a'; size]).await.unwrap();
        fs.release(opened.fh).await.unwrap();
        let cache_files = || {
            std::fs::read_dir(cache_dir.path().join("data"))
                .unwrap()
                .count()
        };
        let before = cache_files();
        while faulty.calls(Op::UploadPart) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read_dir(cache_dir.path().join("snapshots"))
                .unwrap()
                .count(),
            0,
            "the upload copied the file"
        );

        // The first and the last part change while the upload reads the first ones.
        let reopened = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
        fs.write(reopened.fh, 0, b"z").await.unwrap();
        fs.write(reopened.fh, size as u64 - 1, b"z").await.unwrap();
        fs.release(reopened.fh).await.unwrap();
        // The second upload waits out the write-back delay: the store holds the first for 2 s.
        let first = loop {
            match memory.get_all("f").await {
                Ok((_, body)) => break body,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert!(
            first.iter().all(|b| *b == b'a'),
            "the first upload is not the version of the first close"
        );
        assert_eq!(
            cache_files(),
            before,
            "the copy took the cache file's place"
        );

        fs.drain(Some(Duration::from_secs(30))).await.unwrap();
        let (_, last) = memory.get_all("f").await.unwrap();
        let mut expected = vec![b'a'; size];
        expected[0] = b'z';
        expected[size - 1] = b'z';
        assert!(
            last[..] == expected[..],
            "the store lacks the second version"
        );
        let again = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(&fs.read(again.fh, 0, 2).await.unwrap()[..], b"za");
    }
}
