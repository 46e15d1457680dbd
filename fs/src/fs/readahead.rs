//! Read-ahead in the background. While an application reads a file sequentially, the chunks
//! after its position are fetched from the store by tasks of their own, so the store is busy
//! while the application consumes what is already cached. A read waits only for the tasks that
//! bring the bytes it asks for. A task that fails leaves its bytes missing; the read that needs
//! them fetches them itself, and so sees the store's error.
//!
//! A task writes what the store sends into the cache file as it arrives, 1 MiB at a time, each
//! piece under the file's lock and only where bytes are still missing below `remote_limit` of
//! the version it fetched: bytes written by the application meanwhile, a truncation or a new
//! version of the file always win over what arrives late.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::watch;

use super::{FileContents, FileData, Filesystem, blocking};
use crate::cache::{self, RangeSet};
use crate::error::FsResult;
use crate::store::{ETag, GetOptions, GetStream};

/// A range of a file being fetched in the background.
#[derive(Debug)]
pub(super) struct InFlight {
    range: Range<u64>,
    /// Closed when the task ends, whether its bytes are in or not.
    done: watch::Receiver<()>,
}

impl InFlight {
    fn finished(&self) -> bool {
        self.done.has_changed().is_err()
    }
}

/// What a background fetch needs to know of its file.
struct Target {
    key: String,
    source: String,
    etag: ETag,
    data: Arc<FileData>,
    file: Arc<File>,
}

impl Filesystem {
    /// Starts background fetches of what `want` lacks, and of the read-ahead `window` after
    /// its start (as many as the concurrency allows). Returns what to wait for before `want`
    /// can be read; the caller releases the file's lock meanwhile.
    pub(super) async fn fetch_ahead(
        &self,
        key: &str,
        data: &Arc<FileData>,
        content: &mut FileContents,
        want: Range<u64>,
        window: u64,
    ) -> Vec<watch::Receiver<()>> {
        let limit = content.remote_limit();
        let Some(etag) = content.etag().cloned() else {
            return Vec::new();
        };
        let (block, chunk) = (self.config.block_size, self.read_chunk());
        // Whole chunks ahead once the window spans one, so each request is a large one.
        let grain = if window >= chunk { chunk } else { block };
        let start = want.start / block * block;
        let end = want
            .end
            .max(want.start + window)
            .div_ceil(grain)
            .saturating_mul(grain)
            .min(limit);
        if start >= end || content.present().contains(start..end) {
            return Vec::new();
        }
        content.fetching_mut().retain(|f| !f.finished());
        let mut busy = RangeSet::default();
        for fetching in content.fetching() {
            busy.insert(fetching.range.clone());
        }
        let overlaps = |r: &Range<u64>| r.start < want.end && want.start < r.end;
        let mut pieces = Vec::new();
        for gap in content.present().missing(start..end) {
            for idle in busy.missing(gap) {
                let mut at = idle.start;
                while at < idle.end {
                    let piece_end = ((at / chunk + 1) * chunk).min(idle.end);
                    pieces.push(at..piece_end);
                    at = piece_end;
                }
            }
        }
        let mut room = self
            .config
            .concurrency
            .saturating_sub(content.fetching_mut().len());
        pieces.retain(|piece| {
            let needed = overlaps(piece);
            if needed || room > 0 {
                room = room.saturating_sub(usize::from(!needed));
                true
            } else {
                false
            }
        });
        let wanted: u64 = pieces.iter().map(|p| p.end - p.start).sum();
        let cache = self.cache.clone();
        if wanted > 0
            && !blocking(move || Ok(cache.room_for(wanted)))
                .await
                .unwrap_or(false)
        {
            // The cache disk is full: the read fetches what it needs itself, and makes room.
            return Vec::new();
        }
        let source = self.fetch_key(key);
        for piece in pieces {
            let target = Target {
                key: key.to_string(),
                source: source.clone(),
                etag: etag.clone(),
                data: Arc::clone(data),
                file: Arc::clone(content.file()),
            };
            let done = self.spawn_fetch(target, piece.clone());
            content.fetching_mut().push(InFlight { range: piece, done });
        }
        content
            .fetching()
            .iter()
            .filter(|f| overlaps(&f.range))
            .map(|f| f.done.clone())
            .collect()
    }

    /// Bytes a background fetch asks the store for at most: twice an upload part. Its bytes
    /// land in the cache file as they arrive, so the size costs no memory; fewer, larger
    /// requests cost the store less (benches/RESULTS.md, run M).
    fn read_chunk(&self) -> u64 {
        self.config.block_size.max(self.config.part_size * 2)
    }

    /// Fetches `piece` of the target's version into its cache file, in a task of its own.
    fn spawn_fetch(&self, target: Target, piece: Range<u64>) -> watch::Receiver<()> {
        let (finished, done) = watch::channel(());
        let (store, cache) = (Arc::clone(&self.store), self.cache.clone());
        tokio::spawn(async move {
            let options = GetOptions {
                range: Some(piece.clone()),
                if_match: Some(target.etag.clone()),
            };
            let landed = match store.get_stream(&target.source, options).await {
                Ok(got) => land(&target, got).await,
                Err(err) => Err(err.into()),
            };
            let mut content = target.data.content.lock().await;
            content.fetching_mut().retain(|f| f.range != piece);
            match landed {
                Ok(true) => {}
                Ok(false) => return, // The file moved on to another version meanwhile.
                Err(err) => {
                    tracing::debug!("read-ahead of {} stopped: {err}", target.key);
                    return;
                }
            }
            if content.fetching_mut().is_empty() && !content.dirty() {
                // The last of a run of fetches tells the index what is cached now.
                let (name, present) = (content.cache_name().to_string(), content.present().clone());
                let (key, etag) = (target.key, target.etag);
                if let Err(err) =
                    blocking(move || cache.index_version(&key, &name, &etag, &present)).await
                {
                    tracing::warn!(
                        "could not record what is cached of {}: {err}",
                        content.cache_name()
                    );
                }
            }
            drop(finished);
        });
        done
    }
}

/// Writes a GET's bytes into the target's cache file as they arrive, a piece of at most
/// [`cache::WRITE_PIECE`] at a time (so a large request holds little memory, and readers get
/// the file's lock between pieces). Returns false, leaving the rest, once the file has moved
/// on to another version or cache file.
async fn land(target: &Target, got: GetStream) -> FsResult<bool> {
    let (mut body, mut at) = (got.body, got.range.start);
    let mut piece = BytesMut::new();
    loop {
        let frame = body.next().await.transpose()?;
        if let Some(frame) = &frame {
            piece.extend_from_slice(frame);
        }
        if !piece.is_empty() && (frame.is_none() || piece.len() >= cache::WRITE_PIECE) {
            let bytes = piece.split().freeze();
            let len = bytes.len() as u64;
            if !write_missing(target, at, bytes).await? {
                return Ok(false);
            }
            at += len;
        }
        if frame.is_none() {
            return Ok(true);
        }
    }
}

/// Writes `bytes`, the object's from `at`, where the target's cache file still lacks them
/// below `remote_limit`, under the file's lock: bytes the application wrote meanwhile, a
/// truncation or a new version win. Returns false if the file has moved on.
async fn write_missing(target: &Target, at: u64, bytes: Bytes) -> FsResult<bool> {
    let mut content = target.data.content.lock().await;
    if content.etag() != Some(&target.etag) || !Arc::ptr_eq(content.file(), &target.file) {
        return Ok(false);
    }
    let end = at + bytes.len() as u64;
    let gaps = content
        .present()
        .missing(at..end.min(content.remote_limit()));
    let (file, writes) = (Arc::clone(&target.file), gaps.clone());
    blocking(move || {
        for gap in writes {
            let slice = (gap.start - at) as usize..(gap.end - at) as usize;
            cache::write_fetched(&file, &bytes[slice], gap.start)?;
        }
        Ok(())
    })
    .await?;
    for gap in gaps {
        content.fetched(gap);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::cache::Cache;
    use crate::fs::FsConfig;
    use crate::namespace::ROOT;
    use crate::store::faults::{FaultyStore, Op};
    use crate::store::memory::MemoryStore;
    use crate::store::{ErrorKind, PutOptions, SharedStore, Store, StoreError, StoreExt};

    const MIB: usize = 1 << 20;

    /// A mount on a memory store holding `size` bytes of `b'a'` at `big`, with every GET slow.
    async fn slow_store_with_big_file(
        size: usize,
    ) -> (
        Arc<Filesystem>,
        Arc<FaultyStore>,
        Arc<MemoryStore>,
        tempfile::TempDir,
    ) {
        let memory = Arc::new(MemoryStore::new());
        memory
            .put("big", Bytes::from(vec![b'a'; size]), PutOptions::default())
            .await
            .unwrap();
        let inner: SharedStore = memory.clone();
        let faulty = Arc::new(FaultyStore::new(inner));
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(cache_dir.path()).unwrap();
        let config = FsConfig {
            writeback_delay: Duration::ZERO,
            ..FsConfig::default()
        };
        let fs = Arc::new(Filesystem::new(faulty.clone(), cache, config).unwrap());
        fs.start_uploader();
        (fs, faulty, memory, cache_dir)
    }

    /// Reads the start of the file sequentially until read-ahead runs well past `past`.
    async fn start_read_ahead(fs: &Filesystem, fh: u64, past: u64) {
        let mut offset = 0;
        while offset < 1 << 20 {
            fs.read(fh, offset, 128 << 10).await.unwrap();
            offset += 128 << 10;
        }
        let data = fs.file_data(fs.handle_ino(fh).unwrap()).await.unwrap();
        let content = data.content.lock().await;
        assert!(
            content.fetching().iter().any(|f| f.range.contains(&past)),
            "no read-ahead in flight over {past}: {:?}",
            content.fetching()
        );
    }

    /// Bytes written while read-ahead of the same range is on its way win over the store's.
    async fn write_during_read_ahead(size: usize) {
        let (fs, faulty, memory, _cache) = slow_store_with_big_file(size).await;
        faulty.add_latency(Some(Op::Get), Duration::from_millis(300));
        let attr = fs.lookup(ROOT, "big".as_ref()).await.unwrap();
        let opened = fs.open(attr.ino, libc::O_RDWR).await.unwrap();
        let at = 3 * MIB as u64 + 5;
        start_read_ahead(&fs, opened.fh, at).await;

        fs.write(opened.fh, at, b"zzzz").await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let read = fs.read(opened.fh, at - 1, 6).await.unwrap();
        assert_eq!(&read[..], b"azzzza");
        fs.release(opened.fh).await.unwrap();
        fs.drain(Some(Duration::from_secs(20))).await.unwrap();

        let (_, stored) = memory.get_all("big").await.unwrap();
        let mut expected = vec![b'a'; size];
        expected[at as usize..at as usize + 4].copy_from_slice(b"zzzz");
        assert!(stored[..] == expected[..], "the store holds other bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_read_ahead_of_a_small_file_is_kept() {
        write_during_read_ahead(8 * MIB).await;
    }

    /// A file above the copy threshold changes without fetching the rest (it stays partial).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_read_ahead_of_a_partial_file_is_kept() {
        write_during_read_ahead(40 * MIB).await;
    }

    /// A read-ahead request that fails costs the read nothing but time: it asks again itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_read_ahead_is_fetched_by_the_read_that_needs_it() {
        let (fs, faulty, _memory, _cache) = slow_store_with_big_file(8 * MIB).await;
        let attr = fs.lookup(ROOT, "big".as_ref()).await.unwrap();
        let opened = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
        let unavailable = StoreError::new(ErrorKind::Unavailable, "store away");
        faulty.fail_next(Some(Op::Get), 1, unavailable);
        let mut offset = 0;
        while offset < 8 * MIB as u64 {
            let read = fs.read(opened.fh, offset, 128 << 10).await.unwrap();
            assert!(read.len() == 128 << 10 && read.iter().all(|b| *b == b'a'));
            offset += 128 << 10;
        }
        assert!(faulty.calls(Op::Get) > 1);
        fs.release(opened.fh).await.unwrap();
    }
}
